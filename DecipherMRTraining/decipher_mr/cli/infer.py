"""Run a model bundle on one volume or a batch: segmentation, anomaly map, localization, classification
and text-prompted grounding, written in each input's exact geometry with a JSON summary and PNG previews.

--volume takes one volume (NIfTI/NRRD/MHA/MGZ file or DICOM series folder) or a batch: a manifest
(.jsonl), a BIDS dataset (outputs become BIDS derivatives, default --out <bids>/derivatives/decipher-mr)
or a folder of volumes and DICOM series. A batch loads the bundle once, shows a progress bar, reports a
bad volume and goes on, skips what an earlier run already wrote, and lists every volume's outcome in
<out>/infer_summary.csv (exit status 1 if any failed). --dicom-seg also writes each segmentation as a
DICOM Segmentation object with coded labels, referencing the source series of a DICOM input.

examples:
  decipher-mr infer --bundle demo/model.zip --volume demo/data/images/brain-000.nii.gz \\
      --tasks segment,anomaly,localize --query "lesion in the right frontal lobe" --out demo/infer
  decipher-mr infer --bundle demo/model.zip --volume demo/data/manifest.jsonl --out demo/batch
  decipher-mr infer --bundle demo/model.zip --volume /data/bids --tasks segment,anomaly
  decipher-mr infer --bundle demo/model.zip --volume /pacs/study1/T1 --tasks segment --dicom-seg --out out
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TASK_CHOICES = ("segment", "anomaly", "localize", "classify")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="model bundle (folder or .zip)")
    parser.add_argument("--volume", "--input", dest="volume", required=True,
                        help="a NIfTI/NRRD/MHA/MGZ file or DICOM series folder, or a batch: a manifest (.jsonl), "
                             "a BIDS dataset or a folder of volumes")
    parser.add_argument("--input-kind", default="auto", choices=("auto", "volume", "manifest", "bids", "folder"),
                        help="what --volume is (default: guessed)")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks among {','.join(TASK_CHOICES)} (default: every task the bundle "
                             "has a head for)")
    parser.add_argument("--query", action="append", default=[], metavar="TEXT",
                        help="text to ground in the volume (repeatable)")
    parser.add_argument("--out", default=None,
                        help="output folder (required, except for a BIDS dataset: <bids>/derivatives/decipher-mr)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write each segmentation as a DICOM-SEG (<name>.dcm) with coded labels")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (batch)")
    parser.add_argument("--format", default="nii.gz", choices=("nii.gz", "nrrd"), help="volume file format")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--no-previews", action="store_true", help="skip the PNG previews (a batch writes none "
                        "unless --previews)")
    parser.add_argument("--previews", action="store_true", help="write PNG previews in a batch too")


def _tasks(arg: str | None, session) -> list[str]:
    if arg is None:
        have = {spec["task"] for spec in session.bundle.head_specs.values()}
        have |= {"classify"} if "regress" in have else set()
        return [t for t in TASK_CHOICES if t in have]
    tasks = [t.strip() for t in arg.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_CHOICES]
    if bad:
        raise ValueError(f"--tasks: unknown task {bad[0]!r}; choose among {', '.join(TASK_CHOICES)}")
    return tasks


def run(args: argparse.Namespace) -> int:
    from decipher_mr.bundle import BundleError
    from decipher_mr.data.io import VolumeReadError
    from decipher_mr.inference import InferenceError
    from decipher_mr.inference.batch import input_kind

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        kind = input_kind(args.volume) if args.input_kind == "auto" else args.input_kind
        if args.out is None and kind != "bids":
            raise ValueError("--out is required (only a BIDS dataset has a default: <bids>/derivatives/decipher-mr)")
        if kind == "volume":
            return _run_one(args, say)
        return _run_batch(args, kind, say)
    except (BundleError, VolumeReadError, InferenceError, ValueError) as exc:
        say(f"error: {exc}")
        return 2


def _load(args, say):
    from decipher_mr.inference import Session

    t0 = time.perf_counter()
    session = Session.from_bundle(args.bundle, device=args.device)
    say(f"loaded {args.bundle} on {session.device} in {time.perf_counter() - t0:.1f} s")
    tasks = _tasks(args.tasks, session)
    queries = [session.check_query(q) for q in args.query]
    return session, tasks, queries


def _run_batch(args, kind: str, say) -> int:
    from pathlib import Path

    from decipher_mr.inference.batch import discover_inputs, run_batch
    from decipher_mr.inference.derivatives import provenance_record

    session, tasks, queries = _load(args, say)
    inputs = discover_inputs(args.volume, kind)
    out = Path(args.out) if args.out else Path(args.volume) / "derivatives" / "decipher-mr"
    say(f"{len(inputs.items)} volumes in {kind} {args.volume}; outputs to {out}")
    provenance = provenance_record(session, command=" ".join(["decipher-mr", "infer", *sys.argv[2:]])
                                   if len(sys.argv) > 1 and sys.argv[1] == "infer" else "decipher-mr infer",
                                   bundle=args.bundle)
    t0 = time.perf_counter()
    rows = run_batch(session, inputs, out, tasks, queries, fmt=args.format, previews=args.previews,
                     dicom_seg=args.dicom_seg, progress=not args.no_progress, provenance=provenance)
    wall = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    done = counts["ok"]
    say(f"{counts['ok']} written, {counts['skipped']} skipped (already done), {counts['failed']} failed in {wall:.1f} s"
        f"{f' ({done / wall:.2f} volumes/s)' if done and wall > 0 else ''}; summary: {out / 'infer_summary.csv'}")
    return 1 if counts["failed"] else 0


def _run_one(args, say) -> int:
    from decipher_mr.inference import as_volume
    from decipher_mr.inference.batch import run_tasks
    from decipher_mr.inference.outputs import write_results

    session, tasks, queries = _load(args, say)
    volume = as_volume(args.volume)
    t1 = time.perf_counter()
    enc = session.encode(volume)
    say(f"encoded {args.volume} ({'x'.join(map(str, volume.shape))}) on a {'x'.join(map(str, enc.grid))} patch grid"
        f"{f' in {enc.windows} windows' if enc.windows > 1 else ''} in {time.perf_counter() - t1:.1f} s")
    results = run_tasks(session, volume, tasks, queries, say=say)
    summary = write_results(args.out, volume, results, fmt=args.format, previews=not args.no_previews,
                            extra={"bundle": str(args.bundle), "fingerprint": session.fingerprint})
    extra = ""
    if args.dicom_seg:
        from decipher_mr.inference.dicom_seg import write_dicom_segs

        segs = [p for p in write_dicom_segs(session, volume, results, args.out, source=args.volume) if p.suffix == ".dcm"
                and p.parent == Path(args.out)]
        extra = f" and {len(segs)} DICOM-SEG" if segs else ""
    say(f"wrote {len(summary['outputs'])} outputs{extra} and summary.json to {args.out}")
    return 0
