"""Run a model bundle on one volume: segmentation, anomaly map, localization, classification and
text-prompted grounding, written in the input's exact geometry with a JSON summary and PNG previews.

The volume is encoded once; every task and every --query reuses that encoding.

example:
  decipher-mr infer --bundle demo/model.zip --volume demo/data/images/brain-000.nii.gz \\
      --tasks segment,anomaly,localize --query "lesion in the right frontal lobe" --out demo/infer
"""

from __future__ import annotations

import argparse
import sys
import time

TASK_CHOICES = ("segment", "anomaly", "localize", "classify")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="model bundle (folder or .zip)")
    parser.add_argument("--volume", required=True, help="NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks among {','.join(TASK_CHOICES)} (default: every task the bundle "
                             "has a head for)")
    parser.add_argument("--query", action="append", default=[], metavar="TEXT",
                        help="text to ground in the volume (repeatable)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="nii.gz", choices=("nii.gz", "nrrd"), help="volume file format")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--no-previews", action="store_true", help="skip the PNG previews")


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
    from decipher_mr.inference import InferenceError, Session, as_volume
    from decipher_mr.inference.outputs import safe_name, write_results

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        t0 = time.perf_counter()
        session = Session.from_bundle(args.bundle, device=args.device)
        say(f"loaded {args.bundle} on {session.device} in {time.perf_counter() - t0:.1f} s")
        tasks = _tasks(args.tasks, session)
        queries = [session.check_query(q) for q in args.query]
        volume = as_volume(args.volume)
        t1 = time.perf_counter()
        enc = session.encode(volume)
        say(f"encoded {args.volume} ({'x'.join(map(str, volume.shape))}) on a {'x'.join(map(str, enc.grid))} patch grid"
            f"{f' in {enc.windows} windows' if enc.windows > 1 else ''} in {time.perf_counter() - t1:.1f} s")
        results: dict = {}
        for task in tasks:
            t = time.perf_counter()
            if task == "segment":
                results["segmentation"] = session.segment(volume)
            elif task == "anomaly":
                results["anomaly"] = session.anomaly_map(volume)
            elif task == "localize":
                results["localization"] = session.localize(volume)
            elif task == "classify":
                results["classification"] = session.classify(volume)
            say(f"{task}: {time.perf_counter() - t:.2f} s")
        for q in queries:
            t = time.perf_counter()
            results[f"ground-{safe_name(q)}"] = session.ground(volume, q)
            say(f"query {q!r}: {time.perf_counter() - t:.2f} s")
        summary = write_results(args.out, volume, results, fmt=args.format, previews=not args.no_previews,
                                extra={"bundle": str(args.bundle), "fingerprint": session.fingerprint})
    except (BundleError, VolumeReadError, InferenceError, ValueError) as exc:
        say(f"error: {exc}")
        return 2
    say(f"wrote {len(summary['outputs'])} outputs and summary.json to {args.out}")
    return 0
