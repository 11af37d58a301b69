"""Benchmark: report encoding throughput of the text tower and alignment step throughput, on CPU.

1. Text encoding (reports/s): the packaged MiniLM, 2 threads, batch 32, on generated reports of
   typical length (templated findings extended with real radiology finding descriptions from
   radiology-semantic-dict; 60-300 tokens). ``TextTower.encode`` (section-aware truncation,
   length-bucketed batches, padding to the batch's longest report) against two baselines measured
   in the same run: the same model on batches in corpus order padded to 512 tokens (what a plain
   ``tokenizer(..., padding="max_length")`` loop does) and report-by-report encoding.
2. Alignment step (pairs/s): the demo config (vit-tiny on 64^3 crops, frozen MiniLM with
   precomputed report features, batch 16) with GradCache ``chunks=2`` against ``chunks=1`` (the
   price of the memory saving).

    .venv/bin/python Testing/bench/bench_text_align.py [--reports 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from brain_pairs import PLACES, build_brain_pairs, report_for  # noqa: E402
from decipher_mr.assets import radiology_findings  # noqa: E402
from decipher_mr.data.cache import PreparedCache  # noqa: E402
from decipher_mr.models.clip import ImageTextModel  # noqa: E402
from decipher_mr.models.text import TextTower  # noqa: E402
from decipher_mr.models.vit3d import build_vision_encoder  # noqa: E402
from decipher_mr.train.align import TextSide, clip_step, image_batch  # noqa: E402
from decipher_mr.train.clip_loss import ClipLoss  # noqa: E402


def typical_reports(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    records = [r for r in json.loads(radiology_findings().read_text(encoding="utf-8")) if str(r.get("modality", "")).upper() == "MRI"]
    descriptions = [r["description"] for r in records if r.get("description")]
    out = []
    for _ in range(n):
        place = list(PLACES.values())[int(rng.integers(len(PLACES)))]
        base = report_for(["T1", "T2"][int(rng.integers(2))], place, int(rng.choice([8, 12, 16])))
        extra = " ".join(descriptions[int(i)] for i in rng.integers(len(descriptions), size=int(rng.integers(0, 4))))
        out.append(base.replace("No other abnormality.", extra + " No other abnormality."))
    return out


def rate(fn, count: int, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def bench_text(n_reports: int) -> None:
    tower = TextTower.from_spec(None).eval()
    reports = typical_reports(n_reports)
    lengths = [len(tower.tokenizer(r)["input_ids"]) for r in reports]
    tok = tower.tokenizer

    @torch.no_grad()
    def padded_to_512():
        for s in range(0, len(reports), 32):
            b = tok(reports[s : s + 32], padding="max_length", truncation=True, max_length=512, return_tensors="pt")
            tower(b["input_ids"], b["attention_mask"])

    @torch.no_grad()
    def one_by_one():
        for r in reports[:64]:
            b = tok([r], truncation=True, max_length=512, return_tensors="pt")
            tower(b["input_ids"], b["attention_mask"])

    ours = rate(lambda: tower.encode(reports, batch_size=32), len(reports))
    naive = rate(padded_to_512, len(reports), repeats=1)
    single = rate(one_by_one, 64, repeats=1)
    print(f"text encoding, MiniLM, {torch.get_num_threads()} threads, batch 32, {len(reports)} reports "
          f"(median {int(np.median(lengths))} tokens, max {max(lengths)}):")
    print(f"  TextTower.encode (bucketed, dynamic padding): {ours:8.1f} reports/s")
    print(f"  baseline batches padded to 512:               {naive:8.1f} reports/s   -> ours x{ours / naive:.2f}")
    print(f"  baseline report by report:                    {single:8.1f} reports/s   -> ours x{ours / single:.2f}")


def bench_align(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = PreparedCache(build_brain_pairs(Path(tmp) / "pairs", n_train=32, n_val=0, n_test=0))
        idx = list(range(16))
        view = {"size": [64, 64, 64], "mode": "crop", "augment": True}  # align-demo.json
        results = {}
        for chunks in (1, 2):
            torch.manual_seed(0)
            model = ImageTextModel(build_vision_encoder("vit-tiny"), TextTower.from_spec(None))
            model.set_trainable("all", "frozen")
            text = TextSide(model, [cache.items[i].report for i in range(len(cache))], torch.device("cpu"), precompute=True)
            model.train()
            model.set_frozen_towers_eval()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step():
                images = image_batch(cache, idx, view, np.random.default_rng(0))
                opt.zero_grad(set_to_none=True)
                clip_step(model, ClipLoss(), images, text, idx, chunks=chunks)
                opt.step()

            step()  # warm-up
            results[chunks] = rate(lambda: [step() for _ in range(steps)], steps * len(idx), repeats=1)
        print(f"alignment step, demo config (vit-tiny, 64^3 crops, frozen MiniLM features, batch 16), "
              f"{torch.get_num_threads()} threads:")
        print(f"  chunks=1:                {results[1]:8.2f} pairs/s")
        print(f"  chunks=2 (GradCache):    {results[2]:8.2f} pairs/s   -> x{results[2] / results[1]:.2f} of chunks=1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_text(args.reports)
    bench_align(args.steps)


if __name__ == "__main__":
    main()
