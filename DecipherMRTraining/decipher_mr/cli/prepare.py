"""Preprocess every series of a manifest once into a fast, resumable cache.

Each series is turned to the canonical RAS+ orientation, resampled to --spacing, clipped to
percentiles and scaled, optionally cropped to the foreground, and written as a memory-mappable
float32 array; masks and region maps follow on the same grid. Running the command again skips the
series that are already prepared and unchanged, so an interrupted run just continues. Items that
fail are listed with the reason (also in CACHE/failures.json) and the others go on.

example:
  decipher-mr prepare demo/data/manifest.jsonl --out demo/cache --spacing 2 --workers 2

exit codes: 0 all prepared, 1 some series failed (0 with --allow-failures), 2 the cache could not be
prepared at all (unreadable manifest, cache made with different settings).
"""

from __future__ import annotations

import argparse
import sys


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if len(values) == 1 and n == 3:
        values = values * 3
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} numbers, got {text!r}")
    return values


def _spacing(text: str):
    if text.lower() == "native":
        return None
    values = _floats(text, 3, "--spacing")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--spacing: values must be positive, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.io import DEFAULT_MAX_VOXELS
    from ..data.preprocess import INTERPOLATIONS, SCALE_MODES, PreprocessConfig

    d = PreprocessConfig()
    parser.add_argument("manifest", help="JSON Lines manifest, one series per line")
    parser.add_argument("--out", required=True, help="cache folder to write (created; reused to resume)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument(
        "--spacing",
        type=_spacing,
        default=d.target_spacing,
        help="target voxel size in mm: one number (isotropic), three (e.g. 1,1,3) or 'native' "
        f"(default {','.join(str(s) for s in d.target_spacing)})",
    )
    parser.add_argument(
        "--clip",
        type=lambda t: _floats(t, 2, "--clip"),
        default=d.clip_percentiles,
        help="intensity percentiles to clip to (default 0.5,99.5)",
    )
    parser.add_argument("--scale", choices=SCALE_MODES, default=d.scale, help=f"intensity scaling (default {d.scale})")
    parser.add_argument("--no-crop", action="store_true", help="keep the whole field of view (no foreground crop)")
    parser.add_argument("--margin", type=float, default=d.crop_margin_mm, help="foreground crop margin in mm (default 8)")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation, help="image interpolation")
    parser.add_argument("--no-antialias", action="store_true", help="do not low-pass before downsampling")
    parser.add_argument("--series-uid", default=None, help="DICOM series to read from folders holding several")
    parser.add_argument(
        "--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, help=f"refuse larger volumes (default {DEFAULT_MAX_VOXELS})"
    )
    parser.add_argument("--allow-failures", action="store_true", help="exit 0 even if some series failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import PrepareError, prepare_manifest
    from ..data.preprocess import PreprocessConfig

    try:
        config = PreprocessConfig(
            target_spacing=args.spacing,
            clip_percentiles=args.clip,
            scale=args.scale,
            crop_foreground=not args.no_crop,
            crop_margin_mm=args.margin,
            interpolation=args.interpolation,
            antialias=not args.no_antialias,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"preparing {args.manifest} into {args.out} ({args.workers} worker(s))", file=sys.stderr)
    try:
        summary = prepare_manifest(
            args.manifest,
            args.out,
            config,
            workers=args.workers,
            allow_failures=args.allow_failures,
            progress=not args.no_progress,
            series_uid=args.series_uid,
            max_voxels=args.max_voxels,
        )
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    if summary.failed:
        print(f"the failures are listed in {args.out}/failures.json", file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0
