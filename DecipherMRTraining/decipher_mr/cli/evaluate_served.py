"""`decipher-mr evaluate retrieval --bundle` and `evaluate probes`: evaluation through Session (see cli/evaluate.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _out_dir(args: argparse.Namespace, default: Path) -> Path:
    return Path(args.out) if args.out else default


def run_served_retrieval(args: argparse.Namespace) -> int:
    from decipher_mr.bundle import BundleError
    from decipher_mr.eval.served import evaluate_served, finite, markdown
    from decipher_mr.eval.stats import fmt_estimate
    from decipher_mr.inference.session import Session
    from decipher_mr.storage import atomic_write_json, atomic_write_text

    if not args.manifest:
        print("evaluate retrieval: --bundle needs --manifest (the split's images and reports)", file=sys.stderr)
        return 2
    try:
        session = Session.from_bundle(args.bundle, device=args.device)
        if session.model is None:
            raise ValueError(f"{args.bundle}: an image-only bundle has no shared image-report space to evaluate")
        result = evaluate_served(session, args.manifest, args.split, index=args.index, progress=not args.no_progress)
    except (BundleError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"evaluate retrieval: error: {exc}", file=sys.stderr)
        return 2
    bundle = Path(args.bundle)
    out = _out_dir(args, bundle.parent / f"eval-{args.split}")
    atomic_write_json(out / "retrieval.json", finite(json.loads(json.dumps(result, default=float))))
    atomic_write_text(out / "retrieval.md", markdown(result))
    for problem in result["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"{result['n']} pairs in split {args.split!r} ({result['studies']} studies), through Session of {bundle.name}:")
    for name, e in result["figures"].items():
        if "skipped" not in e:
            print(f"  {name:<62} {fmt_estimate(e)}  chance {e['chance']:.3f}  {e['verdict']}")
    print(f"wrote {out / 'retrieval.json'} and {out / 'retrieval.md'}")
    return 0


def run_probes(args: argparse.Namespace) -> int:
    from decipher_mr.bundle import BundleError
    from decipher_mr.data.views import DEFAULT_VIEW
    from decipher_mr.eval.probes import markdown, probe_table, random_init_session
    from decipher_mr.eval.served import finite
    from decipher_mr.eval.stats import fmt_estimate
    from decipher_mr.inference.session import Session
    from decipher_mr.storage import atomic_write_json, atomic_write_text

    sessions = {}
    try:
        for spec in args.encoder:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--encoder {spec!r}: expected NAME=BUNDLE")
            sessions[name] = Session.from_bundle(path, device=args.device)
        if args.random_like:
            if args.random_like not in sessions:
                raise ValueError(f"--random-like {args.random_like!r}: no --encoder of that name")
            like = [s for s in args.encoder if s.partition("=")[0] == args.random_like][0].partition("=")[2]
            sessions[f"random init ({args.random_like} architecture)"] = random_init_session(
                Session.from_bundle(like, device=args.device), args.seed)
        # one view for all encoders: the aligned bundle's, else the default
        views = [getattr(s.model, "image_view", None) for s in sessions.values() if s.model is not None]
        view = json.loads(args.view) if args.view else next((v for v in views if v), DEFAULT_VIEW)
        if not isinstance(view, dict):
            raise ValueError(f"--view {args.view!r}: expected a JSON object")
        result = probe_table(sessions, args.manifest, args.split, view=view, progress=not args.no_progress)
    except (BundleError, ValueError, FileNotFoundError, OSError, json.JSONDecodeError) as exc:
        print(f"evaluate probes: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    atomic_write_json(out / "probes.json", finite(json.loads(json.dumps(result, default=str))))
    atomic_write_text(out / "probes.md", markdown(result))
    for name, e in result["figures"].items():
        print(f"  {name:<58} {fmt_estimate(e)}  chance {e['chance']:.3f}  {e['verdict']}")
    print(f"wrote {out / 'probes.json'} and {out / 'probes.md'}")
    return 0


SUMMARY_FIGURES = (
    ("retrieval.json", "Reports like this volume: body-region precision@5 (index)", "Reports like this volume: same body region, precision@5"),
    ("retrieval.json", "zero-shot body region (balanced accuracy)", "zero-shot body region, balanced accuracy"),
    ("retrieval.json", "image→report R@5", "volume → its own report, R@5"),
    ("retrieval.json", "report→image R@5", "report → its own volume, R@5"),
    ("retrieval.json", "zero-shot lesion vs normal (AUC)", "zero-shot lesion vs normal, AUC"),
)


def summary_table(folders: list[str | Path]) -> str:
    """One short Markdown table (figure, value [95% CI], n, chance, verdict) from the evaluation folders'
    retrieval.json, probes.json and heads.json (whichever are there)."""
    from decipher_mr.eval.stats import TABLE_HEAD, table_row

    found: dict[str, dict] = {}
    for folder in folders:
        for name in ("retrieval.json", "probes.json", "heads.json"):
            path = Path(folder) / name
            if path.is_file():
                found[name] = json.loads(path.read_text(encoding="utf-8"))
    lines = list(TABLE_HEAD)
    for file, key, label in SUMMARY_FIGURES:
        e = (found.get(file) or {}).get("figures", {}).get(key)
        if e and "skipped" not in e and e.get("n"):
            lines.append(table_row(label, e))
    probes = (found.get("probes.json") or {}).get("figures", {})
    for key, e in probes.items():
        if e.get("probe") == "linear" and e.get("task") in ("body region", "lesion present"):
            lines.append(table_row(f"linear probe, {e['task']}: {e['encoder']}", e))
    if found.get("heads.json"):
        from decipher_mr.eval.heads_session import summary_rows

        for label, e in summary_rows(found["heads.json"]):
            if e and e.get("n"):
                lines.append(table_row(label, e, 1 if "mm" in label else 3))
    return "\n".join(lines) + "\n"


def run_summary(args: argparse.Namespace) -> int:
    from decipher_mr.storage import atomic_write_text

    text = summary_table(args.folders)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), "# Demo model evaluation (through the served path)\n\n" + text +
                          "\nIntervals: 95% bootstrap by study. Research use only; the demo corpus is generated.\n")
    return 0
