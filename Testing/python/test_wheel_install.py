"""A GPU server installs the engine from a built wheel, not a source checkout: build it, install it into a
fresh virtual environment, and run ``decipher-mr worker`` and ``decipher-mr view`` from there.

The wheel is built from a copy of the package folder (plus the Slicer module's ``DecipherMRLib``, laid out
as in the checkout) with ``pip wheel --no-build-isolation`` (offline, this environment's setuptools). The
new environment is a plain venv whose ``site-packages`` gets one ``.pth`` line naming the project
environment's ``site-packages`` (torch and the other dependencies are not downloaded again); the
``decipher_mr`` package itself, its console script and the vendored ``DecipherMRLib`` come from the
wheel: every command runs from a folder outside the checkout and is checked to import from the new venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from browser import ROOT, free_port

pytest.importorskip("setuptools")


def _copy_sources(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.pyc")
    shutil.copytree(ROOT / "DecipherMRTraining", dest / "DecipherMRTraining", ignore=ignore)
    shutil.copytree(ROOT / "DecipherMR" / "DecipherMRLib", dest / "DecipherMR" / "DecipherMRLib", ignore=ignore)
    return dest / "DecipherMRTraining"


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    """(python, decipher-mr script, env, work folder) of a fresh venv holding the wheel."""
    work = tmp_path_factory.mktemp("wheel")
    package = _copy_sources(work / "src")
    dist = work / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(package), "-w", str(dist)], check=True, cwd=work, timeout=600)
    (wheel,) = dist.glob("decipher_mr-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, cwd=work, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DECIPHER_MR_SLICER_MODULE", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return python, venv / "bin" / "decipher-mr", env, work


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "Testing" / "bench"))
    from bench_inference import make_bundle

    return make_bundle(tmp_path_factory.mktemp("wheel_bundle") / "bundle", "vit-micro", (4.0, 4.0, 4.0))


def test_the_package_and_the_module_library_come_from_the_wheel(server_env):
    python, _, env, work = server_env
    code = ("import decipher_mr, json; from decipher_mr.viewer import module_lib; lib = module_lib(); "
            "print(json.dumps([decipher_mr.__file__, lib.__file__]))")
    package, lib = json.loads(subprocess.check_output([str(python), "-c", code], cwd=work, env=env, text=True))
    venv = (work / "venv").resolve()
    assert Path(package).resolve().is_relative_to(venv), package
    assert Path(lib).resolve().is_relative_to(venv / "lib"), lib
    assert "slicer_module" in Path(lib).parts
    assert not Path(work).resolve().is_relative_to(ROOT)


def test_worker_from_the_wheel_loads_a_bundle_and_answers(server_env, tiny_bundle, tmp_path):
    from decipher_mr.data.volume import Volume, write_volume

    _, cli, env, work = server_env
    volume = write_volume(Volume(np.random.default_rng(0).random((40, 44, 36), dtype=np.float32) * 100, (2.0, 2.0, 2.0)),
                          tmp_path / "t1.nii.gz")
    proc = subprocess.Popen([str(cli), "worker", "--bundle", str(tiny_bundle), "--device", "cpu", "--out", str(tmp_path / "out")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=env, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["type"] == "ready", ready
        assert "grounding" in ready["heads"]
        requests = [{"id": 1, "method": "info"},
                    {"id": 2, "method": "ground", "params": {"volume": str(volume), "text": "left frontal lobe"}},
                    {"id": 3, "method": "shutdown"}]
        out, err = proc.communicate("".join(json.dumps(r) + "\n" for r in requests), timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    finals = {m["id"]: m for m in map(json.loads, out.splitlines()) if m["type"] in ("result", "error")}
    assert finals[1]["type"] == "result" and finals[1]["result"]["fingerprint"] == ready["fingerprint"], err[-2000:]
    assert finals[2]["type"] == "result", (finals[2], err[-2000:])
    assert Path(finals[2]["result"]["file"]).is_file()
    assert proc.returncode == 0


def test_view_from_the_wheel_serves_the_page(server_env, tiny_bundle):
    _, cli, env, work = server_env
    port = free_port()
    token = "wheel-test-token"
    log = work / f"view-{port}.log"
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen([str(cli), "view", "--port", str(port), "--bundle", str(tiny_bundle), "--device", "cpu"],
                                stdout=sink, stderr=subprocess.STDOUT, cwd=work, env={**env, "DECIPHER_MR_VIEWER_TOKEN": token})
    try:
        deadline = time.monotonic() + 180
        while "DecipherMR viewer: http" not in log.read_text(encoding="utf-8", errors="replace"):
            assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")
            assert time.monotonic() < deadline, log.read_text(encoding="utf-8", errors="replace")
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?secret={token}", timeout=60) as reply:
            assert reply.status == 200
            page = reply.read().decode("utf-8", errors="replace")
        assert "<html" in page.lower() and "script" in page.lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
