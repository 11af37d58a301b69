"""Benchmark: the engine on a "GPU server" over SSH against the local worker, in the same run.

A random ``vit-small`` bundle with a grounding head (speed does not depend on trained weights) is loaded by
two ``decipher-mr worker`` processes driven by the Slicer module's own ``WorkerEngine``: one local (NRRD files
on a shared disk, as today) and one started through the real OpenSSH client and a real ``sshd`` on
127.0.0.1 (``Testing/python/ssh_server.py``; volumes and maps in-band, protocol 2). On the real Colin27 T1
(181x217x181):

* **send**: the one-time cost of sending the volume to the server (``put_volume``), the connection
  already up;
* **query**: a new text query on the encoded volume, engine call to maps in hand (median of the repeats),
  for the local worker, the SSH engine with exact maps and with float16 maps.

Loopback measures the protocol's own cost (encoding, ssh encryption, decoding), not a network's bandwidth:
over a real link add (bytes sent) / (link speed), which the run prints.

    .venv/bin/python Testing/bench/bench_remote.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE.parents[1] / "DecipherMR"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUERIES = ["left frontal lobe", "right temporal lobe lesion", "cerebellum", "enhancing mass near the ventricle",
           "occipital cortex", "periventricular white matter hyperintensity", "left hippocampus", "brainstem"]


def quiet(fraction, message):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="vit-small")
    args = parser.parse_args()

    from bench_inference import make_bundle
    from ssh_server import LoopbackSSHServer, sshd_available

    from decipher_mr.assets import colin27_t1
    from decipher_mr.data.io import read_volume
    from decipher_mr.data.volume import freeze
    from decipher_mr.inference.transport import encode_volume
    from DecipherMRLib.Engine import WorkerEngine

    reason = sshd_available()
    if reason:
        print(f"bench_remote: skipped: {reason}")
        return 0
    repeats = min(args.repeats, len(QUERIES) - 1)
    volume = read_volume(colin27_t1())
    freeze(volume.array)  # read-only, as the panel's snapshot of a volume node: keyed and hashed once
    worker = f"env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 {Path(sys.executable).with_name('decipher-mr')}"
    cancel = threading.Event()
    with tempfile.TemporaryDirectory() as tmp, LoopbackSSHServer(Path(tmp) / "sshd") as server:
        os.environ["DECIPHER_MR_CACHE"] = str(Path(tmp) / "cache")
        bundle = str(make_bundle(Path(tmp) / "bundle", args.preset, (2.0, 2.0, 2.0)))
        engines = {"local worker": WorkerEngine(bundle, device="cpu"),
                   "ssh, exact maps": WorkerEngine(bundle, device="cpu", target=server.target(worker)),
                   "ssh, float16 maps": WorkerEngine(bundle, device="cpu", target=server.target(worker),
                                                     map_precision="float16")}
        times, first, sent = {}, {}, None
        try:
            for name, engine in engines.items():
                t0 = time.perf_counter()
                engine.connect(quiet, cancel)
                connect = time.perf_counter() - t0
                if engine.target is not None and sent is None:
                    client = engine._client
                    t0 = time.perf_counter()
                    engine._send_volume(client, volume, quiet, cancel)
                    sent = time.perf_counter() - t0
                t0 = time.perf_counter()
                engine.ground(volume, QUERIES[0], quiet, cancel)  # encoder pass (and the send, if not yet)
                first[name] = (connect, time.perf_counter() - t0)
            for i in range(repeats):  # interleaved: the machine's load hits every engine alike
                for name, engine in engines.items():
                    t0 = time.perf_counter()
                    result = engine.ground(volume, QUERIES[1 + i], quiet, cancel)
                    times.setdefault(name, []).append(time.perf_counter() - t0)
                    assert result["heatmap"].array.ndim == 3
                    if name == "local worker":
                        heat = result["heatmap"]  # the exact map, as the server computes it
        finally:
            for engine in engines.values():
                engine.close()
    blob = encode_volume(volume)
    heat_bytes = {p: len(encode_volume(heat, precision=p)["data"]) for p in ("exact", "float16")}
    print(f"Remote engine over SSH on loopback: Colin27 {volume.shape}, {args.preset} (random weights), CPU, "
          f"median of {repeats} new queries")
    print(f"  one-time send of the volume: {sent:.3f} s ({len(blob['data']) / 2**20:.1f} MiB in-band, "
          f"{volume.array.nbytes / 2**20:.1f} MiB raw)")
    local = statistics.median(times["local worker"])
    for name, values in times.items():
        med = statistics.median(values)
        connect, query1 = first[name]
        print(f"  {name:18s}: query {med:.3f} s ({med / local:.2f}x local); start {connect:.2f} s, first query "
              f"{query1:.2f} s")
    print(f"  maps per query in-band: exact {heat_bytes['exact'] / 2**20:.1f} MiB heatmap (+ mask), float16 "
          f"{heat_bytes['float16'] / 2**20:.1f} MiB; at 1 Gbit/s add about {heat_bytes['exact'] * 8 / 1e9:.2f} / "
          f"{heat_bytes['float16'] * 8 / 1e9:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
