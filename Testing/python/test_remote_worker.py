"""The engine on "another machine": a real OpenSSH server on 127.0.0.1 (``ssh_server.py``) starts the real
``decipher-mr worker`` for the real ``ssh`` client, and volumes and maps travel in-band (protocol 2).

Through it, on the real Colin27 T1 with a small bundle: segment, anomaly, text query and retrieval
(the same answers as the local worker), cancel, a refused key, an unreachable port, a missing remote
``decipher-mr``, an old worker's protocol version, and the connection killed mid-run (the next run
reconnects). The panel's logic (``ModuleLogic``) drives it on a slicer-core scene. Nothing leaves loopback.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "DecipherMR"))
sys.path.insert(0, str(HERE))

from ssh_server import LoopbackSSHServer, free_port, sshd_available  # noqa: E402

from decipher_mr.data.io import read_volume  # noqa: E402
from decipher_mr.inference.client import ProtocolMismatch, RequestCancelled, WorkerClient, WorkerCrashed  # noqa: E402
from decipher_mr.inference.transport import EngineTarget, decode_volume, encode_volume  # noqa: E402

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))

# sshd gives the session a clean environment: the remote command sets what the worker needs, as a
# server's own wrapper script would.
WORKER = f"env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 {Path(sys.executable).with_name('decipher-mr')}"
OLD_WORKER = """#!/bin/sh
# a decipher-mr from before protocol 2: announces itself, then waits for its stdin to close
echo '{"type": "ready", "protocol": 1, "pid": 1, "bundle": "b", "fingerprint": "f", "device": "cpu"}'
cat > /dev/null
"""


@pytest.fixture(scope="module")
def bundle_and_index(prepared_demo_cache, demo_corpus, tmp_path_factory):
    from bundle_factory import build_test_bundle
    from decipher_mr.index import build_index
    from decipher_mr.inference import Session

    work = tmp_path_factory.mktemp("remote_bundle")
    bundle = build_test_bundle(prepared_demo_cache, work, tasks=("segment", "anomaly", "ground"))
    build_index(Session.from_bundle(bundle, device="cpu", heads=[]), demo_corpus, work / "index", progress=False)
    return str(bundle), str(work / "index")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LoopbackSSHServer(tmp_path_factory.mktemp("sshd")) as srv:
        yield srv


@pytest.fixture(scope="module")
def colin27():
    from decipher_mr.assets import colin27_t1

    return read_volume(colin27_t1())


def engine(server, bundle_and_index, **kwargs):
    from DecipherMRLib.Engine import WorkerEngine

    bundle, index = bundle_and_index
    return WorkerEngine(bundle, device="cpu", index=index, target=server.target(WORKER), **kwargs)


def quiet(fraction, message):
    pass


def test_engine_target_builds_a_batch_mode_ssh_command_and_refuses_option_injection():
    target = EngineTarget.parse("alice@gpu-1:2200", identity="/keys/id", remote_command="/opt/dmr/bin/decipher-mr")
    cmd = target.command("/srv/models/my bundle.zip", "cuda")
    assert cmd[cmd.index("-p") + 1] == "2200" and "BatchMode=yes" in cmd and "-T" in cmd
    assert cmd[-3:] == ["--", "alice@gpu-1", "/opt/dmr/bin/decipher-mr worker --bundle '/srv/models/my bundle.zip' --device cuda"]
    assert not EngineTarget.parse("local").remote and not EngineTarget.parse("").remote
    for bad in ("-oProxyCommand=touch x", "alice@-oProxyCommand=x", "a b@host"):
        with pytest.raises(ValueError):
            EngineTarget.parse(bad)
    with pytest.raises(ValueError):
        EngineTarget.parse("alice@gpu-1", ssh_options=["ProxyCommand touch x"])


def test_volumes_and_maps_cross_in_band_exactly(colin27):
    back = decode_volume(encode_volume(colin27))
    assert back.array.dtype == colin27.array.dtype and np.array_equal(back.array, colin27.array)
    assert back.spacing == colin27.spacing and np.allclose(back.direction, colin27.direction)
    heat = dataclasses.replace(colin27, array=np.random.default_rng(0).random(colin27.shape, dtype=np.float32))
    assert np.array_equal(decode_volume(encode_volume(heat)).array, heat.array)
    assert np.abs(decode_volume(encode_volume(heat, precision="float16")).array - heat.array).max() <= 2.5e-4


def test_noise_byte_planes_are_stored_and_the_rest_compressed_losslessly(colin27):
    from decipher_mr.inference.transport import decode_array, encode_array

    rng = np.random.default_rng(1)
    smooth = np.linspace(0, 1, 64 * 48 * 40, dtype=np.float32).reshape(64, 48, 40) + rng.random((64, 48, 40), np.float32) * 1e-3
    blob = encode_array(smooth)
    kinds = [kind for kind, _ in blob["planes"]]
    assert kinds[0] == "raw" and kinds[-1] == "zlib"  # the low mantissa byte is noise, the exponent byte is not
    assert np.array_equal(decode_array(blob), smooth)
    for array in (colin27.array, (smooth * 1000).astype(np.int16), smooth > 0.5, np.zeros((0, 2, 3), np.float32),
                  np.arange(24, dtype=">i4").reshape(2, 3, 4)):
        back = decode_array(encode_array(array))
        assert np.array_equal(back, array) and back.shape == array.shape
    import base64
    import zlib

    shuffled = smooth.reshape(-1).view(np.uint8).reshape(-1, 4).T.tobytes()  # one zlib stream, as first sent
    one_stream = {k: v for k, v in blob.items() if k != "planes"}
    assert np.array_equal(decode_array({**one_stream, "data": base64.b64encode(zlib.compress(shuffled)).decode()}), smooth)
    for planes in ([["raw", 5]], [["zip", 1]] * 4, [["raw", -1]] * 4, [["raw", 10**9]] * 4):
        with pytest.raises(ValueError):
            decode_array({**blob, "planes": planes})


def test_the_panel_snapshot_of_an_unchanged_node_is_reused_and_hashed_once():
    pytest.importorskip("slicer")
    import slicer.util  # noqa: F401
    from DecipherMRLib.Engine import WorkerEngine
    from DecipherMRLib.VolumeBridge import array_from_volume_node, volume_from_node
    from slicer_scenes import add_colin27, scene_with_slice_views

    scene = scene_with_slice_views()
    node = add_colin27(scene)
    first = volume_from_node(node)
    assert volume_from_node(node) is first and not first.array.flags.writeable
    engine = WorkerEngine("b.zip", device="cpu")
    try:
        key = engine._key(first)
        assert engine._key(first) == key and id(first) in engine._keys
        from decipher_mr.inference.encoding import _REMEMBERED, volume_content_hash

        content = volume_content_hash(first)  # the session's cache key: also computed once for a snapshot
        assert id(first) in _REMEMBERED and volume_content_hash(first) == content
        assert volume_content_hash(dataclasses.replace(first, spacing=(2.0, 1.0, 1.0))) != content
        array_from_volume_node(node)[3, 4, 5] += 1  # edited in place, as slicer.util.arrayFromVolume does
        node.GetImageData().GetPointData().GetScalars().Modified()  # arrayFromVolumeModified
        second = volume_from_node(node)
        assert second is not first and second.array[3, 4, 5] == first.array[3, 4, 5] + 1
        assert engine._key(second) != key
    finally:
        engine.close()


def test_segment_anomaly_query_and_retrieval_through_ssh_match_the_local_worker(server, bundle_and_index, colin27):
    from DecipherMRLib.Engine import WorkerEngine

    remote = engine(server, bundle_and_index)
    local = WorkerEngine(bundle_and_index[0], device="cpu", index=bundle_and_index[1])
    cancel = threading.Event()
    try:
        info = remote.connect(quiet, cancel)
        assert info["protocol"] == 2 and info["fingerprint"] and info["device"] == "cpu" and "gpu" in info
        seg_r, seg_l = remote.segment(colin27, quiet, cancel), local.segment(colin27, quiet, cancel)
        assert seg_r["label_names"] == seg_l["label_names"]
        assert np.array_equal(seg_r["labels"].array, seg_l["labels"].array)
        assert np.allclose(seg_r["labels"].affine_lps, seg_l["labels"].affine_lps)
        for r, l in ((remote.anomaly(colin27, quiet, cancel), local.anomaly(colin27, quiet, cancel)),
                     (remote.ground(colin27, "left frontal lobe", quiet, cancel),
                      local.ground(colin27, "left frontal lobe", quiet, cancel))):
            assert np.array_equal(r["heatmap"].array, l["heatmap"].array)
            assert np.array_equal(r["mask"].array, l["mask"].array) and r["peak_ijk"] == l["peak_ijk"]
        hits_r, hits_l = remote.similar_reports(colin27, quiet, cancel, k=3), local.similar_reports(colin27, quiet, cancel, k=3)
        assert [h["position"] for h in hits_r] == [h["position"] for h in hits_l] and len(hits_r) == 3
        assert [h["position"] for h in remote.find_cases("lesion", quiet, cancel, k=3)] == \
               [h["position"] for h in local.find_cases("lesion", quiet, cancel, k=3)]
        # the volume crossed once and was encoded once: the engine stayed warm on the server
        stats = remote._client.request("info", timeout=600)["stats"]
        assert len(remote._sent) == 1 and stats["encoder_passes"] == 1 and stats["encode_cache_hits"] >= 3
    finally:
        remote.close()
        local.close()


def test_cancel_stops_the_remote_request_and_the_connection_stays_warm(server, bundle_and_index, colin27):
    from DecipherMRLib.Engine import WorkerEngine

    bundle, index = bundle_and_index
    remote = WorkerEngine(bundle, device="cpu", index=index, target=server.target(WORKER),
                          worker_args=["--max-tokens", "64"])  # many windows: still running when cancelled
    large = dataclasses.replace(colin27, spacing=(3.0, 3.0, 3.0))
    cancel = threading.Event()

    def progress(fraction, message):
        if "Encoding" in message:
            cancel.set()

    try:
        with pytest.raises(RequestCancelled):
            remote.segment(large, progress, cancel)
        client = remote._client
        assert client.alive  # stopped by the worker at its checkpoint, not by dropping the connection
        assert remote.segment(colin27, quiet, threading.Event())["labels"].array.ndim == 3
        assert remote._client is client
    finally:
        remote.close()


def test_a_refused_key_an_unreachable_port_and_a_missing_engine_say_so(server, bundle_and_index, tmp_path):
    bundle = bundle_and_index[0]
    refused = server.target(WORKER, identity=server.stranger_key)
    with pytest.raises(WorkerCrashed, match="refused the key"):
        WorkerClient(bundle, device="cpu", target=refused).start()
    nobody = dataclasses.replace(server.target(WORKER), port=free_port())
    with pytest.raises(WorkerCrashed, match="cannot reach the DecipherMR engine"):
        WorkerClient(bundle, device="cpu", target=nobody).start()
    missing = server.target(str(tmp_path / "no-such" / "decipher-mr"))
    with pytest.raises(WorkerCrashed, match="was not found on 127.0.0.1"):
        WorkerClient(bundle, device="cpu", target=missing).start()
    missing_bundle = server.target(WORKER)
    with pytest.raises(WorkerCrashed, match="could not start"):
        WorkerClient(str(tmp_path / "not-on-the-server.zip"), device="cpu", target=missing_bundle).start()


def test_an_old_worker_protocol_is_refused_with_a_version_message(server, tmp_path):
    old = tmp_path / "decipher-mr"
    old.write_text(OLD_WORKER)
    old.chmod(0o755)
    client = WorkerClient("b.zip", device="cpu", target=server.target(str(old)))
    with pytest.raises(ProtocolMismatch, match="speaks worker protocol 1.*protocol 2"):
        client.start()
    assert not client.alive


def test_a_connection_killed_mid_run_fails_cleanly_and_the_next_run_reconnects(server, bundle_and_index, colin27):
    from DecipherMRLib.Engine import WorkerEngine

    bundle, index = bundle_and_index
    remote = WorkerEngine(bundle, device="cpu", index=index, target=server.target(WORKER), worker_args=["--max-tokens", "64"])
    large = dataclasses.replace(colin27, spacing=(3.0, 3.0, 3.0))
    cancel = threading.Event()
    remote.connect(quiet, cancel)
    sessions = server.sessions()
    assert sessions, "no sshd session for the connection"

    def progress(fraction, message):
        if "Encoding" in message:
            for proc in sessions:  # the server side of this connection dies, as when a link drops
                proc.kill()

    try:
        with pytest.raises(WorkerCrashed, match="dropped|reach"):
            remote.segment(large, progress, cancel)
        assert not remote._client.alive
        seg = remote.segment(colin27, quiet, cancel)  # reconnects, sends the volume again
        assert seg["labels"].array.ndim == 3 and remote._client.alive
    finally:
        remote.close()


def test_the_panel_logic_runs_on_a_remote_engine_and_leaves_the_scene_alone_on_failure(server, bundle_and_index):
    slicer = pytest.importorskip("slicer")
    from DecipherMRLib.Engine import WorkerEngine
    from DecipherMRLib.ModuleLogic import ModuleLogic
    from DecipherMRLib.Runner import RunState
    from slicer_scenes import add_colin27, scene_with_slice_views

    bundle, index = bundle_and_index

    def factory(bundle, device, index, target):  # the test server's ssh config (known host key) added
        return WorkerEngine(bundle, device=device, index=index, target=dataclasses.replace(
            target, ssh_config=str(server.client_config)))

    scene = scene_with_slice_views()
    t1 = add_colin27(scene)
    logic = ModuleLogic(scene, engine_factory=factory)
    failures, done = [], []
    logic.runner.failed.connect(lambda name, message, details: failures.append(message))
    logic.runner.finished.connect(lambda name, result: done.append(name))
    try:
        logic.configure(bundle, device="cpu", index=index, engine=server.engine, identity=str(server.user_key),
                        remote_command=WORKER)
        assert logic.remote
        logic.query(t1, "left frontal lobe")
        assert logic.runner.wait() is RunState.IDLE and not failures, failures
        assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
        info = logic.engineInfo()
        assert info["fingerprint"] and info["device"] == "cpu" and info["protocol"] == 2
        nodes = scene.GetNumberOfNodes()
        logic.configure(bundle, device="cpu", index=index, engine=server.engine, identity=str(server.stranger_key),
                        remote_command=WORKER)
        logic.segment(t1)
        assert logic.runner.wait() is RunState.IDLE
        assert failures and "refused the key" in failures[-1] and scene.GetNumberOfNodes() == nodes
    finally:
        logic.shutdown()


NO_TORCH_RUN = """
import sys
sys.modules["torch"] = None  # this laptop has no torch: importing it fails, find_spec says it is missing
sys.path[:0] = sys.argv[1:3]
import importlib.util
from DecipherMRLib.ModuleLogic import ModuleLogic
from DecipherMRLib.PanelInputs import bundle_location
from DecipherMRLib.Runner import RunState
from slicer_scenes import add_colin27, scene_with_slice_views

bundle, engine, key, command, config = sys.argv[3:8]
assert importlib.util.find_spec("torch") is None
scene = scene_with_slice_views()
logic = ModuleLogic(scene)
assert not logic.dependenciesReady("local") and logic.dependenciesReady(engine)
assert bundle_location(bundle, remote=True) == bundle  # a server path, not on this disk
failures = []
logic.runner.failed.connect(lambda name, message, details: failures.append(message))
logic.configure(bundle, device="cpu", engine=engine, identity=key, remote_command=command, ssh_config=config)
assert logic.remote and logic.dependenciesReady()
logic.query(add_colin27(scene), "left frontal lobe")
assert logic.runner.wait() is RunState.IDLE and not failures, failures
assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
info = logic.engineInfo()
logic.shutdown()
assert sys.modules["torch"] is None and not [m for m in sys.modules if m.startswith("torch.")]
print("ENGINE", info["fingerprint"], info["device"])
"""


def test_a_laptop_without_torch_runs_the_panel_logic_on_a_remote_engine(server, bundle_and_index, tmp_path):
    """The dependency check asks a remote engine's laptop for no torch, and a whole query then runs with
    torch unimportable here (it loads on the server only); the bundle path is the server's, taken as typed."""
    pytest.importorskip("slicer")
    import subprocess

    served = tmp_path / "server-only" / "bundle"  # a path that exists on the "server" side only
    served.parent.mkdir()
    served.symlink_to(Path(bundle_and_index[0]).resolve())
    run = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, str(HERE.parents[1] / "DecipherMR"), str(HERE), str(served),
                          server.engine, str(server.user_key), WORKER, str(server.client_config)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "ENGINE " in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.split("ENGINE ")[1].split()[1] == "cpu"


def test_the_viewer_over_ssh_serves_its_page_and_answers_a_query_through_its_websocket(server, bundle_and_index, tmp_path):
    """`decipher-mr view --engine user@127.0.0.1 ...`: the page is served, and a query sent as the page sends
    it (wslink over the websocket: the query field's Enter trigger) runs on the remote engine and lands in
    the viewer's scene; the panel then names what the server loaded."""
    pytest.importorskip("trame_slicer")
    import asyncio
    import re
    import time

    import aiohttp
    from browser import ViewerServer, Wslink
    from decipher_mr.assets import colin27_t1

    viewer = ViewerServer("--engine", server.engine, "--ssh-key", str(server.user_key), "--ssh-config",
                          str(server.client_config), "--remote-command", WORKER, "--bundle", bundle_and_index[0],
                          "--device", "cpu", "--volume", str(colin27_t1()), log_dir=tmp_path)

    async def session() -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{viewer.base}index.html?secret={viewer.token}") as page:
                assert page.status == 200 and '<div id="app">' in await page.text()
            async with http.ws_connect(f"ws://localhost:{viewer.port}/ws?secret={viewer.token}") as ws:
                client = Wslink(ws)
                assert "result" in await client.hello(viewer.token)

                async def state() -> dict:
                    return (await client.call("trame.state.get"))["result"]["state"]

                s = await state()
                while not s.get("dmr_volumes"):  # the volume given on the command line is loaded at start
                    await asyncio.sleep(0.2)
                    s = await state()
                field = re.search(r'<VTextField id="dmr-query"[^>]*>', str(s["trame__template_main"])).group(0)
                trigger = re.search(r"@keydown.enter=\"trigger\('([^']+)'", field).group(1)  # what the page's Enter calls
                answer = await client.call("trame.trigger", [trigger, ["left frontal lobe"], {}])
                assert "error" not in answer, answer
                deadline = time.monotonic() + 600
                while s.get("dmr_jobs_done", 0) < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    s = await state()
                return s

    try:
        with ThreadPoolExecutor(1) as pool:
            s = pool.submit(asyncio.run, session()).result()
    finally:
        viewer.close()
    assert s["dmr_last_job"] == {"name": "query", "outcome": "finished"}, (s.get("dmr_error"), viewer.log()[-3000:])
    assert s["dmr_highlight"] and len(s["dmr_highlight"]["ras"]) == 3
    assert [item["segments"] for item in s["dmr_scene"] if "segments" in item] == [["left frontal lobe"]]
    assert "on " + server.engine in s["dmr_model_info"] and "cpu" in s["dmr_model_info"]
    assert "left frontal lobe" not in viewer.log()  # the query text is never logged
