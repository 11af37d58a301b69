"""Benchmark: the browser viewer's text query, from Enter in the page to the highlight in the scene,
against the engine alone answering the same query in the same run.

A random ``vit-small`` bundle with a grounding head (speed does not depend on trained weights) is served
by the real ``decipher-mr view`` (the model in the persistent worker process, as in the Slicer module),
and Debian's headless Chromium opens the real Colin27 T1 (181x217x181) by typing its path. Then:

* **viewer**: type a new query and press Enter; time until the page's state says the job ended
  (worker round trip, result files, segment + markup written into the MRML scene, views jumped and
  re-rendered, state pushed to the page). The first query (worker start, model load, encoder pass) is
  reported on its own.
* **baseline**: ``Session.ground`` in this process on the same volume, encoded once, a new text each time.

The ratio viewer / engine is the price of the page, the worker and the scene on top of the model.

    .venv/bin/python Testing/bench/bench_viewer.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUERIES = ["left frontal lobe", "right temporal lobe lesion", "cerebellum", "enhancing mass near the ventricle",
           "occipital cortex", "periventricular white matter hyperintensity", "left hippocampus", "brainstem"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--preset", default="vit-small")
    parser.add_argument("--engine", default="worker", choices=("worker", "in-process"))
    args = parser.parse_args()

    from bench_inference import make_bundle
    from browser import CHROMIUM, CHROMIUM_ARGS, ViewerPage, ViewerServer
    from playwright.sync_api import sync_playwright

    from decipher_mr.assets import colin27_t1
    from decipher_mr.data.io import read_volume
    from decipher_mr.inference import Session

    repeats = min(args.repeats, len(QUERIES) - 1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DECIPHER_MR_CACHE"] = str(Path(tmp) / "cache")
        bundle = make_bundle(Path(tmp) / "bundle", args.preset, (2.0, 2.0, 2.0))

        def measure(grid: str):
            """The viewer with maps on the model grid (now) or resampled onto the input grid (before)."""
            os.environ["DECIPHER_MR_MAP_GRID"] = grid
            server = ViewerServer("--bundle", str(bundle), "--device", "cpu", "--encoder", "turbo-jpeg", "--engine", args.engine, log_dir=Path(tmp))
            try:
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                    t = time.perf_counter()
                    page = ViewerPage(browser, server.url)
                    page.open_volume(colin27_t1())
                    page.view_image("Red", settle=0.5)
                    open_s = time.perf_counter() - t

                    def query(text: str) -> float:
                        # the clock runs from Enter to the page's state saying the job ended, watched in the
                        # page itself every 5 ms (a Python-side poll of the page would add its own interval)
                        done = page.state("dmr_jobs_done")
                        page.page.fill("#dmr-query", text)
                        t = time.perf_counter()
                        page.page.press("#dmr-query", "Enter")
                        page.page.wait_for_function("(n) => window.trame.state.get('dmr_jobs_done') > n", arg=done,
                                                    polling=5, timeout=600_000)
                        elapsed = time.perf_counter() - t
                        job = page.state("dmr_last_job")
                        assert job == {"name": "query", "outcome": "finished"}, page.state("dmr_error")
                        return elapsed

                    first_s = query(QUERIES[0])
                    viewer = [query(q) for q in QUERIES[1:1 + repeats]]
                    segments = page.scene("Segmentation")[0]["segments"]
                    assert len(segments) == 1 + repeats, segments
                    browser.close()
            finally:
                server.close()

            return open_s, first_s, viewer

        runs = {grid: measure(grid) for grid in ("input", "model")}
        open_s, first_s, viewer = runs["model"]
        session = Session.from_bundle(bundle, device="cpu")
        volume = read_volume(colin27_t1())
        session.ground(volume, "warm-up query")
        engine = []
        for q in QUERIES[1:1 + repeats]:
            t = time.perf_counter()
            session.ground(volume, q + " ")
            engine.append(time.perf_counter() - t)

    v, e = statistics.median(viewer), statistics.median(engine)
    old = statistics.median(runs["input"][2])
    print(f"viewer: page open + Colin27 181x217x181 loaded and drawn: {open_s:.1f} s; first query (worker start, model "
          f"load, encoder pass): {first_s:.1f} s")
    print(f"viewer: text query, Enter -> highlight in the scene and the page: median {v * 1000:.0f} ms over {len(viewer)} "
          f"new queries ({args.preset}, random weights, {args.engine} engine)")
    print(f"viewer, previous path (maps resampled onto the input grid, DECIPHER_MR_MAP_GRID=input): median "
          f"{old * 1000:.0f} ms; model-grid maps / previous = {v / old:.2f}x")
    print(f"baseline, Session.ground in-process on the encoded volume: median {e * 1000:.0f} ms; "
          f"ratio viewer / engine = {v / e:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
