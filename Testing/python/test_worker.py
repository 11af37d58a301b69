"""The worker protocol end to end: a real ``decipher-mr worker`` subprocess driven by the real client.

One worker per module (the bundle is loaded once, as in the Slicer module). Requests use the real
Colin27 T1 written to disk; the crash test kills a second worker with SIGKILL mid-request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import shared_test_bundle
from decipher_mr.data.io import read_volume
from decipher_mr.data.volume import Volume, write_volume
from decipher_mr.inference.client import RequestCancelled, WorkerClient, WorkerCrashed, WorkerError

QUERY = "lesion in the left frontal lobe"


@pytest.fixture(scope="module")
def bundle(prepared_demo_cache, tmp_path_factory) -> Path:
    return shared_test_bundle(prepared_demo_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    """Colin27 at 2 mm (quick), and at full size declared 3 mm (many windows: slow enough to cancel)."""
    from decipher_mr.assets import colin27_t1

    folder = tmp_path_factory.mktemp("worker_volumes")
    vol = read_volume(colin27_t1())
    small = Volume(np.ascontiguousarray(vol.array[::2, ::2, ::2]), (2.0, 2.0, 2.0), vol.origin, vol.direction)
    large = Volume(vol.array, (3.0, 3.0, 3.0), vol.origin, vol.direction)
    return {"small": write_volume(small, folder / "small.nii.gz"), "large": write_volume(large, folder / "large.nii.gz")}


@pytest.fixture(scope="module")
def client(bundle, tmp_path_factory):
    # small windows make the large volume take many encoder passes, so a cancel lands mid-request
    with WorkerClient(bundle, device="cpu", out=str(tmp_path_factory.mktemp("worker_out")),
                      extra_args=["--max-tokens", "64"]) as c:
        yield c


def test_worker_announces_itself_with_the_bundle_and_heads(client):
    assert client.info["type"] == "ready" and client.info["protocol"] == 2
    assert {"lobes", "lesion", "grounding", "lobe-boxes", "region"} <= set(client.info["heads"])
    assert client.request("ping") == {"pong": True}


def test_ground_request_streams_progress_and_writes_a_heatmap_in_the_input_geometry(client, volumes):
    progress = []
    result = client.request("ground", {"volume": str(volumes["small"]), "text": QUERY}, on_progress=progress.append,
                            timeout=300)
    assert progress and all(m["type"] == "progress" and 0 <= m["fraction"] <= 1 for m in progress)
    assert {m["stage"] for m in progress} >= {"encode"}
    heat = read_volume(result["file"], allow_constant=True)
    src = read_volume(volumes["small"])
    assert heat.same_geometry(src) and result["query"] == QUERY and len(result["box_ijk"]) == 6


def test_second_request_on_the_same_volume_is_a_cache_hit(client, volumes):
    client.request("segment", {"volume": str(volumes["small"])}, timeout=300)
    again = client.request("anomaly", {"volume": str(volumes["small"])}, timeout=300)
    assert again["cached"] is True
    stats = client.request("info")["stats"]
    assert stats["encode_cache_hits"] >= 1


@pytest.mark.parametrize("line, code", [("{not json", "invalid_json"), ('["a list"]', "bad_request"),
                                        ('{"id": 5}', "bad_request")])
def test_malformed_requests_get_an_error_and_the_worker_keeps_serving(client, line, code):
    before = len(client.unmatched)
    client.send_line(line)
    assert client.request("ping", timeout=60) == {"pong": True}
    if code == "invalid_json":
        assert client.unmatched[before]["error"]["code"] == code


@pytest.mark.parametrize("method, params, match", [
    ("ground", {"text": QUERY}, "missing parameter 'volume'"),
    ("ground", {"volume": "/no/such/volume.nii.gz", "text": QUERY}, "volume.nii.gz: file or folder does not exist"),
    ("ground", {"volume": "SMALL", "text": "   "}, "query is empty"),
    ("ground", {"volume": "SMALL", "text": "x" * 2000}, "too long"),
    ("teleport", {}, "unknown method 'teleport'"),
    ("retrieve_cases", {"volume": "SMALL", "index": "/no/such/index"}, "not a retrieval index"),
])
def test_bad_requests_are_errors_naming_the_problem(client, volumes, method, params, match):
    params = {k: (str(volumes["small"]) if v == "SMALL" else v) for k, v in params.items()}
    with pytest.raises(WorkerError, match=match):
        client.request(method, params, timeout=300)
    assert client.request("ping", timeout=60) == {"pong": True}


def test_cancel_stops_a_running_request_and_the_worker_goes_on(client, volumes):
    seen = []
    handle = client.submit("encode", {"volume": str(volumes["large"])}, on_progress=seen.append)
    deadline = time.monotonic() + 120
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    handle.cancel()
    with pytest.raises(RequestCancelled):
        handle.result(timeout=120)
    assert client.request("ping", timeout=60) == {"pong": True}


def test_cancel_of_a_queued_request_drops_it(client, volumes):
    first = client.submit("encode", {"volume": str(volumes["large"])})
    queued = client.submit("segment", {"volume": str(volumes["small"])})
    queued.cancel()
    first.cancel()
    for h in (first, queued):
        with pytest.raises(RequestCancelled):
            h.result(timeout=120)


def test_a_killed_worker_becomes_a_clear_error_at_the_client(bundle, volumes):
    with WorkerClient(bundle, device="cpu", extra_args=["--max-tokens", "64"]) as c:
        seen = []
        handle = c.submit("encode", {"volume": str(volumes["large"])}, on_progress=seen.append)
        while not seen:
            time.sleep(0.01)
        os.kill(c.process.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed, match="killed by signal 9 while handling request"):
            handle.result(timeout=60)
        with pytest.raises(WorkerCrashed):
            c.submit("ping")


def test_a_bundle_that_cannot_load_fails_at_start_with_its_reason(tmp_path):
    with pytest.raises(WorkerCrashed, match="could not start.*bundle not found"):
        WorkerClient(tmp_path / "missing-bundle", device="cpu").start()


def test_stdout_carries_only_protocol_lines(bundle, volumes):
    requests = [{"id": 1, "method": "ping"}, {"id": 2, "method": "encode", "params": {"volume": str(volumes["small"])}},
                {"id": 3, "method": "shutdown"}]
    proc = subprocess.run([sys.executable, "-m", "decipher_mr", "worker", "--bundle", str(bundle), "--device", "cpu"],
                          input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    messages = [json.loads(line) for line in proc.stdout.splitlines()]  # every line parses
    assert messages[0]["type"] == "ready"
    finals = [m for m in messages if m["type"] in ("result", "error")]
    assert [m["id"] for m in finals] == [1, 2, 3] and all(m["type"] == "result" for m in finals)
