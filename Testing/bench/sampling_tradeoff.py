"""Stage-2 batch composition, measured: purely organ-aware, purely random, and the default share in between.

Runs ``decipher-mr align`` on the demo corpus once per ``mixed_fraction`` (same stage-1 encoder, text
encoder, seed and iterations as ``make demo``), exports each as an alignment-only bundle and evaluates it
through ``Session`` (``evaluate retrieval --bundle``) on the test split. Prints one table: within-region
image→report R@5 (findings must separate same-region studies) against body-region precision@5 and
zero-shot body region (the shared space must know the anatomy), each with its 95% interval and chance.

    .venv/bin/python Testing/bench/sampling_tradeoff.py --demo demo            # after `make demo`; ~15 min on 2 cores
    .venv/bin/python Testing/bench/sampling_tradeoff.py --demo demo --fractions 0 0.5 1 --reuse 0.5=demo/runs/align

Not part of ``make bench`` (it trains); its table is in the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "decipher_mr"]
FIGURES = (("image→report R@5 within the body region", "within-region R@5"),
           ("volume→report body-region precision@5 (split)", "body-region precision@5"),
           ("zero-shot body region (balanced accuracy)", "zero-shot body region"),
           ("image→report R@5", "image→report R@5"))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo", help="the make demo folder (data/, cache/, runs/vision, runs/text)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--reuse", action="append", default=[], metavar="FRACTION=RUN",
                    help="an existing align run for a fraction (e.g. make demo's own, 0.5=demo/runs/align)")
    ap.add_argument("--out", default=None, help="folder for runs and results (default: DEMO/runs/sampling)")
    args = ap.parse_args()
    demo = Path(args.demo).resolve()
    out = Path(args.out) if args.out else demo / "runs" / "sampling"
    reuse = {float(k): Path(v) for k, v in (r.split("=", 1) for r in args.reuse)}
    cfg = REPO / "DecipherMRTraining" / "configs" / "align-demo.json"
    rows = []
    for frac in args.fractions:
        tag = f"mixed-{frac:g}"
        run_dir = reuse.get(frac, out / tag)
        t0 = time.perf_counter()
        if frac not in reuse:
            run(CLI + ["align", "--config", str(cfg), f"cache={demo / 'cache'}", f"output={run_dir}",
                       f"mixed_fraction={frac}", "progress=false",
                       'vision={"export": "%s"}' % (demo / "runs" / "vision"),
                       'text={"path": "%s", "pooling": "mean", "max_length": 256}' % (demo / "runs" / "text" / "text_encoder")])
        bundle = out / f"{tag}.zip"
        run(CLI + ["export", "--out", str(bundle), "--align", str(run_dir), "--preprocess", str(demo / "cache"),
                   "--name", f"sampling-{tag}"])
        run(CLI + ["evaluate", "retrieval", "--bundle", str(bundle), "--manifest", str(demo / "data" / "manifest.jsonl"),
                   "--split", "test", "--out", str(out / f"eval-{tag}"), "--no-progress"])
        figs = json.loads((out / f"eval-{tag}" / "retrieval.json").read_text(encoding="utf-8"))["figures"]
        rows.append((frac, {short: figs.get(key) for key, short in FIGURES}, time.perf_counter() - t0))
    head = "| mixed_fraction | " + " | ".join(short for _, short in FIGURES) + " |"
    lines = [head, "|" + "---|" * (len(FIGURES) + 1)]
    for frac, figs, _ in rows:
        cells = []
        for _, short in FIGURES:
            e = figs[short]
            cells.append("n/a" if not e or e.get("value") is None else
                         f"{e['value']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] (chance {e['chance']:.2f})")
        label = {0.0: "0 (organ-aware only)", 1.0: "1 (random)"}.get(frac, f"{frac:g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = json.loads((out / f"eval-mixed-{args.fractions[0]:g}" / "retrieval.json").read_text(encoding="utf-8"))["n"]
    table = "\n".join(lines) + f"\n\nTest split: {n} volumes; 95% bootstrap intervals by study.\n"
    (out / "tradeoff.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
