"""The worker's processes as 3D Slicer starts them, and Slicer's GUI process kept free of torch.

Inside Slicer the worker's ``python`` is ``PythonSlicer``: a launcher (CTKAppLauncher) that starts the
real interpreter as its child on the same stdin/stdout/stderr and waits for it. The launcher written
here does exactly that, so kill, cancel and close are checked on a real two-process tree serving a
real bundle on the real Colin27 T1. A suspended worker stands in for a long native call that never
reaches a cancel checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from bundle_factory import shared_test_bundle
from decipher_mr.data.io import read_volume
from decipher_mr.data.volume import Volume, write_volume
from decipher_mr.inference.client import WorkerClient, WorkerCrashed, WorkerError, _popen_platform_options

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1] / "DecipherMR"
SMALL_WINDOWS = ["--max-tokens", "64"]  # many encoder passes: a request runs long enough to interrupt

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the test launcher is a POSIX script (#!)")

LAUNCHER = '''#!{python}
"""Like CTKAppLauncher: run the real interpreter as a child on the same channels, wait, return its code."""
import subprocess
import sys

code = subprocess.Popen([{python!r}, *sys.argv[1:]]).wait()
sys.exit(code if code >= 0 else 1)
'''


@pytest.fixture(scope="module")
def bundle(prepared_demo_cache, tmp_path_factory) -> Path:
    return shared_test_bundle(prepared_demo_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    """An executable that behaves like PythonSlicer: ``launcher -m decipher_mr worker ...``."""
    path = tmp_path_factory.mktemp("launcher") / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def large_t1(tmp_path_factory) -> Path:
    """Colin27 at full size declared 3 mm: many windows, so a request is still running when interrupted."""
    from decipher_mr.assets import colin27_t1

    vol = read_volume(colin27_t1())
    large = Volume(vol.array, (3.0, 3.0, 3.0), vol.origin, vol.direction)
    return write_volume(large, tmp_path_factory.mktemp("worker_process_volumes") / "large.nii.gz")


def start_through_launcher(bundle, launcher, out) -> tuple[WorkerClient, psutil.Process, psutil.Process]:
    """A client whose worker runs under the launcher; returns it with the launcher and the real worker."""
    client = WorkerClient(bundle, device="cpu", out=str(out), python=str(launcher), extra_args=SMALL_WINDOWS).start()
    parent = psutil.Process(client.process.pid)
    worker = psutil.Process(client.info["pid"])
    assert worker.ppid() == parent.pid != os.getpid()  # the real interpreter is the launcher's child
    return client, parent, worker


def gone(proc: psutil.Process) -> bool:
    """Ended: no such process, or a zombie waiting for whoever adopted it (it holds no memory or pipe)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def running_request(client, volume: Path):
    """Submit a long encode and return its handle once the worker reports progress on it."""
    seen = []
    handle = client.submit("encode", {"volume": str(volume)}, on_progress=seen.append)
    wait_for(lambda: seen or handle.done())
    assert not handle.done(), "the request finished before it could be interrupted"
    return handle


def worker_processes(folder: Path, launcher: Path) -> tuple[list, list]:
    """(launchers, real workers) alive anywhere on the machine whose command line names ``folder``."""
    launchers, workers = [], []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(folder) in arg for arg in cmdline) and "worker" in cmdline and not gone(proc):
            (launchers if any(str(launcher) == arg for arg in cmdline) else workers).append(proc)
    return launchers, workers


# --- Windows flags -----------------------------------------------------------------------------------


def test_popen_options_hide_the_console_on_windows_and_start_a_process_group_elsewhere():
    windows = _popen_platform_options("win32")
    assert windows["creationflags"] == 0x08000000  # CREATE_NO_WINDOW
    info = windows["startupinfo"]
    assert (info.dwFlags, info.wShowWindow) == (0x1, 0)  # STARTF_USESHOWWINDOW, SW_HIDE
    assert "start_new_session" not in windows
    assert _popen_platform_options("linux") == _popen_platform_options("darwin") == {"start_new_session": True}


# --- the process tree --------------------------------------------------------------------------------


@posix_only
def test_kill_ends_the_launcher_and_the_real_worker_and_fails_the_request_at_once(bundle, launcher, large_t1, tmp_path):
    client, parent, worker = start_through_launcher(bundle, launcher, tmp_path)
    assert os.getpgid(worker.pid) == parent.pid  # the launcher leads a process group its child shares
    handle = running_request(client, large_t1)
    started = time.monotonic()
    client.kill()
    with pytest.raises(WorkerError) as failure:
        handle.result(timeout=5)
    assert failure.value.code == "closed"
    assert time.monotonic() - started < 10
    assert gone(parent) and gone(worker) and not client.alive
    for reader in client._threads:  # the stdout/stderr pipes reached EOF: no process holds them
        reader.join(timeout=10)
        assert not reader.is_alive()
    with pytest.raises(WorkerCrashed):
        client.submit("ping")


@posix_only
def test_close_of_an_idle_worker_shuts_it_down_cleanly_through_the_launcher(bundle, launcher, tmp_path):
    client, parent, worker = start_through_launcher(bundle, launcher, tmp_path)
    assert client.request("ping", timeout=60) == {"pong": True}
    client.close(timeout=60)
    assert client.process.returncode == 0, client._stderr_tail()  # the launcher passed on the worker's clean exit
    assert gone(parent) and gone(worker)


@posix_only
def test_close_of_a_worker_that_does_not_stop_kills_the_whole_tree(bundle, launcher, large_t1, tmp_path):
    client, parent, worker = start_through_launcher(bundle, launcher, tmp_path)
    handle = running_request(client, large_t1)
    worker.suspend()  # it can no longer answer the shutdown: close must fall back to killing
    started = time.monotonic()
    client.close(timeout=1)
    assert time.monotonic() - started < 10
    assert gone(parent) and gone(worker)
    with pytest.raises(WorkerError, match="closed before request"):
        handle.result(timeout=5)


def _gui_script(bundle: Path, launcher: Path, out: Path, ending: str) -> str:
    """A stand-in for Slicer's GUI process: start a worker through the launcher, print the pids, then end."""
    return textwrap.dedent(f"""
        import json, os, sys, time
        from decipher_mr.inference.client import WorkerClient
        client = WorkerClient({str(bundle)!r}, device="cpu", out={str(out)!r}, python={str(launcher)!r}).start()
        print(json.dumps([client.process.pid, client.info["pid"]]), flush=True)
        {ending}
    """)


@posix_only
@pytest.mark.parametrize("ending", ["sys.exit(0)", "time.sleep(600)"], ids=["exits", "is-killed"])
def test_no_worker_outlives_the_gui_process(bundle, launcher, tmp_path, ending):
    """Exiting runs the client's finalizer (kills the tree); a GUI killed outright closes the worker's
    stdin, and the worker exits at its end."""
    gui = subprocess.Popen([sys.executable, "-c", _gui_script(bundle, launcher, tmp_path, ending)],
                           stdout=subprocess.PIPE, text=True)
    try:
        parent, worker = (psutil.Process(pid) for pid in json.loads(gui.stdout.readline()))
        if ending.startswith("time.sleep"):
            gui.send_signal(signal.SIGKILL)
        assert gui.wait(timeout=60) in (0, -signal.SIGKILL)
        wait_for(lambda: gone(parent) and gone(worker), timeout=30)
    finally:
        gui.kill()


@posix_only
def test_kill_without_psutil_uses_the_process_group(bundle, launcher, large_t1, tmp_path):
    """Slicer does not ship psutil: the client then kills the worker's process group."""
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys, time

        class NoPsutil(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "psutil" or name.startswith("psutil."):
                    raise ImportError("psutil is not installed here")

        sys.meta_path.insert(0, NoPsutil())
        from decipher_mr.inference.client import WorkerClient
        client = WorkerClient({str(bundle)!r}, device="cpu", out={str(tmp_path)!r}, python={str(launcher)!r},
                              extra_args={SMALL_WINDOWS!r}).start()
        print(json.dumps([client.process.pid, client.info["pid"]]), flush=True)
        seen = []
        handle = client.submit("encode", {{"volume": {str(large_t1)!r}}}, on_progress=seen.append)
        while not seen:
            time.sleep(0.01)
        client.kill()
        try:
            handle.result(timeout=5)
        except Exception as exc:
            print(json.dumps([getattr(exc, "code", None), "psutil" in sys.modules]), flush=True)
        time.sleep(600)  # stay alive: the tree must be gone while its parent still runs
    """)
    gui = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        parent, worker = (psutil.Process(pid) for pid in json.loads(gui.stdout.readline()))
        assert json.loads(gui.stdout.readline()) == ["closed", False]
        wait_for(lambda: gone(parent) and gone(worker), timeout=10)
    finally:
        gui.kill()
        gui.wait()


# --- the module's engine -----------------------------------------------------------------------------


@pytest.fixture()
def module_through_launcher(bundle, launcher):
    """ModuleLogic on a real scene, its worker started through the launcher, cancel grace 0.5 s."""
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(MODULE_DIR))
    from DecipherMRLib.Engine import WorkerEngine
    from DecipherMRLib.ModuleLogic import ModuleLogic
    from slicer_scenes import add_colin27

    scene = slicer.vtkMRMLScene()
    t1 = add_colin27(scene)
    logic = ModuleLogic(scene, engine_factory=functools.partial(WorkerEngine, python=str(launcher), cancel_grace_s=0.5))
    logic.configure(str(bundle), device="cpu")
    events = []
    logic.runner.failed.connect(lambda name, message, details: events.append(("failed", name, message)))
    logic.runner.cancelled.connect(lambda name: events.append(("cancelled", name)))
    logic.runner.finished.connect(lambda name, result: events.append(("finished", name)))
    yield scene, t1, logic, events
    logic.shutdown()


@posix_only
def test_a_cancel_past_its_grace_kills_the_tree_and_the_next_run_starts_one_worker(module_through_launcher, launcher):
    from DecipherMRLib.Runner import RunState

    scene, t1, logic, events = module_through_launcher
    logic.segment(t1)
    assert logic.runner.wait(timeout=300) is RunState.IDLE and events[-1] == ("finished", "segment"), events
    engine = logic.engine()
    parent, worker = psutil.Process(engine._client.process.pid), psutil.Process(engine._client.info["pid"])
    before = scene.GetNumberOfNodes()

    worker.suspend()  # a long native call: the cancel is never answered
    logic.anomaly(t1)
    wait_for(lambda: engine._handle is not None, timeout=60)
    started = time.monotonic()
    logic.runner.cancel()
    assert logic.runner.wait(timeout=30) is RunState.IDLE  # the panel leaves "Cancelling…"
    assert time.monotonic() - started < 0.5 + 10
    assert events[-1] == ("cancelled", "anomaly map") and scene.GetNumberOfNodes() == before
    assert gone(parent) and gone(worker)
    assert worker_processes(engine.folder, launcher) == ([], [])

    logic.segment(t1)
    assert logic.runner.wait(timeout=300) is RunState.IDLE and events[-1] == ("finished", "segment"), events
    launchers, workers = worker_processes(engine.folder, launcher)
    assert len(launchers) == len(workers) == 1 and workers[0].pid == engine._client.info["pid"] != worker.pid


# --- torch stays out of the GUI process ----------------------------------------------------------------

TORCH_FREE_GUI = """
import importlib.abc, json, sys

BLOCKED = ("torch", "monai", "transformers")


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be imported in Slicer's GUI process")


sys.meta_path.insert(0, Blocked())
module_dir, testing_dir, bundle = sys.argv[1:4]
sys.path[:0] = [module_dir, testing_dir]

import slicer
from DecipherMRLib.ModuleLogic import ModuleLogic
from slicer_scenes import add_colin27

scene = slicer.vtkMRMLScene()
t1 = add_colin27(scene)
logic = ModuleLogic(scene)  # the default engine factory, as the panel builds it
logic.configure(bundle, device="cpu")
failures = []
logic.runner.failed.connect(lambda name, message, details: failures.append(details))
logic.segment(t1)
logic.runner.wait(timeout=300)
segmentations = scene.GetNodesByClass("vtkMRMLSegmentationNode")
segments = segmentations.GetItemAsObject(0).GetSegmentation().GetNumberOfSegments() if segmentations.GetNumberOfItems() else 0
engine = type(logic.engine()).__name__
logic.shutdown()
print(json.dumps({"engine": engine, "failures": failures, "segments": segments,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_a_worker_request_from_the_module_never_imports_torch_in_the_gui_process(bundle):
    pytest.importorskip("slicer")
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_GUI, str(MODULE_DIR), str(HERE), str(bundle)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == [] and report["engine"] == "WorkerEngine"
    assert report["segments"] > 0  # the worker's labels landed in the scene
    assert report["loaded"] == []
