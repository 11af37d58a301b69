"""Outputs of a BIDS input as a BIDS derivative dataset (``<bids>/derivatives/decipher-mr/``).

For a source ``sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz`` the outputs keep the source's entities
and folder, name the head in ``seg-``/``label-`` and the source's suffix in ``desc-`` (so a T1w and a
T2w of one session do not collide), and sit on the source's exact grid (no ``space-``)::

    sub-01_ses-1_seg-lobes_desc-T1w_dseg.nii.gz     label map      + .json sidecar + _dseg.tsv label table
    sub-01_ses-1_label-lesion_desc-T1w_probseg.nii.gz  anomaly map [0, 1]  + .json
    sub-01_ses-1_label-lesion_desc-T1w_mask.nii.gz  its thresholded mask   + .json
    sub-01_ses-1_label-<query>_desc-T1w_probseg.nii.gz  text grounding      + .json (the query)

Each sidecar names its source (``Sources``, a BIDS URI through ``DatasetLinks.raw``) and the
provenance (bundle, its fingerprint, package version, command). ``dataset_description.json`` says
``DatasetType: derivative`` with ``GeneratedBy``. :func:`derivative_name_problems` checks every name
against the BIDS schema's derivative rules (bidsschematools).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from decipher_mr.data.volume import write_volume
from decipher_mr.storage import atomic_write_json, atomic_write_text

from .results import HeatmapResult, LocalizationResult, SegmentationResult

PIPELINE = "decipher-mr"
BIDS_VERSION = "1.10.0"
_SUFFIX = re.compile(r"_([A-Za-z0-9]+)\.nii(\.gz)?$")


def alnum(text: str) -> str:
    """A BIDS entity value (letters and digits only): ``lobe-boxes`` -> ``lobeboxes``."""
    return re.sub(r"[^A-Za-z0-9]", "", text) or "x"


def source_parts(rel: str) -> tuple[str, str, str]:
    """``(folder, entity prefix, suffix)`` of a BIDS source path relative to the dataset root.

    >>> source_parts("sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz")
    ('sub-01/ses-1/anat', 'sub-01_ses-1_run-1', 'T1w')
    """
    path = Path(rel)
    m = _SUFFIX.search(path.name)
    if not m or not path.name.startswith("sub-"):
        raise ValueError(f"{rel}: not a BIDS image name (sub-<label>[_<entity>-<label>]..._<suffix>.nii[.gz])")
    return path.parent.as_posix(), path.name[: m.start()], m.group(1)


def provenance_record(session, command: str | None = None, bundle: str | None = None) -> dict[str, Any]:
    """What every sidecar says about how it was made."""
    from decipher_mr import __version__

    cfg = session.bundle.config
    return {"Bundle": str(bundle or session.bundle.source), "BundleName": str(cfg.get("name", "")),
            "BundleFingerprint": session.fingerprint, "Version": __version__, "Command": command or ""}


def write_dataset_description(root: str | Path, source_root: str | Path, provenance: dict[str, Any]) -> Path:
    """``dataset_description.json`` (and ``.bidsignore`` for the batch summary) of the derivative dataset."""
    from decipher_mr import __version__

    from .batch import SUMMARY_CSV

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    raw = Path(os.path.relpath(Path(source_root).resolve(), root.resolve())).as_posix()
    generated = {"Name": PIPELINE, "Version": __version__,
                 "Description": f"DecipherMR inference with bundle {provenance.get('BundleName') or provenance.get('Bundle', '')}"
                                f" (fingerprint {provenance.get('BundleFingerprint', '')[:16]})",
                 "CodeURL": "https://github.com/DecipherMR/DecipherMR"}
    desc = {"Name": "DecipherMR outputs", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [generated], "DatasetLinks": {"raw": raw + "/"},
            "SourceDatasets": [{"URL": raw + "/"}]}
    atomic_write_json(root / "dataset_description.json", desc)
    atomic_write_text(root / ".bidsignore", f"{SUMMARY_CSV}\n")
    return root / "dataset_description.json"


def _sidecar(rel_source: str, provenance: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**fields, "Sources": [f"bids:raw:{rel_source}"], "GeneratedBy": "decipher-mr",
            "DecipherMR": dict(provenance)}


def dseg_tsv(rows: list[dict[str, Any]]) -> str:
    """A BIDS ``_dseg.tsv`` label table: index, name, and the coded concept of each label."""
    from decipher_mr.bundle.codes import label_codes

    coded = {c.index: c for c in label_codes(rows, keep_background=False)}
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "name", "category", "type"])
    for n, row in enumerate(rows):
        index = int(row.get("index", n))
        c = coded.get(index)
        w.writerow([index, row.get("name", ""), "^".join(c.category) if c else "n/a", "^".join(c.type) if c else "n/a"])
    return buf.getvalue()


def write_bids_outputs(root: str | Path, rel_source: str, volume, results: dict[str, Any], session,
                       provenance: dict[str, Any]) -> list[Path]:
    """Write ``results`` for the BIDS source ``rel_source`` into the derivative dataset ``root``."""
    root = Path(root)
    folder, prefix, suffix = source_parts(rel_source)
    base = root / folder / prefix
    desc = f"desc-{alnum(suffix)}"
    files: list[Path] = []

    def image(name: str, vol) -> Path:
        files.append(write_volume(vol, f"{base}_{name}.nii.gz"))
        return files[-1]

    def sidecar(name: str, **fields: Any) -> None:
        path = Path(f"{base}_{name}.json")
        atomic_write_json(path, _sidecar(rel_source, provenance, **fields))
        files.append(path)

    for key, res in results.items():
        if isinstance(res, SegmentationResult):
            name = f"seg-{alnum(res.head)}_{desc}_dseg"
            image(name, res.labels)
            rows = session.bundle.labels.get(res.head) or [{"index": i, "name": n} for i, n in enumerate(res.label_names)]
            tsv = Path(f"{base}_{name}.tsv")
            atomic_write_text(tsv, dseg_tsv(rows))
            files.append(tsv)
            sidecar(name, Description=f"segmentation by head {res.head}", VolumeML=res.summary()["volume_ml"])
        elif isinstance(res, HeatmapResult):
            label = alnum(res.head if res.query is None else key.removeprefix("ground-"))
            what = "text grounding map" if res.query is not None else "anomaly map"
            extra = {"Query": res.query} if res.query is not None else {}
            name = f"label-{label}_{desc}_probseg"
            image(name, res.heatmap)
            sidecar(name, Description=f"{what} in [0, 1] by head {res.head}", **extra, Threshold=res.threshold,
                    PeakVoxel=res.peak_ijk)
            mname = f"label-{label}_{desc}_mask"
            mask = res.mask.with_array(np.asarray(res.mask.array).astype(np.uint8))
            image(mname, mask)
            sidecar(mname, Description=f"largest component of the {what} above {res.threshold:g}", **extra,
                    Type="ROI" if res.query is not None else "Lesion", BoxVoxels=res.box_ijk)
        elif isinstance(res, LocalizationResult) and res.heatmaps:
            stacked = np.zeros(volume.shape, np.uint8)
            names = list(res.heatmaps)
            for n, label in enumerate(names, start=1):
                box = res.structures[label]["box_ijk"]
                if box is not None:
                    stacked[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = n
            name = f"seg-{alnum(res.head)}_{desc}_dseg"
            image(name, volume.with_array(stacked))
            tsv = Path(f"{base}_{name}.tsv")
            atomic_write_text(tsv, dseg_tsv([{"index": 0, "name": "background"}]
                                            + [{"index": n, "name": s} for n, s in enumerate(names, start=1)]))
            files.append(tsv)
            sidecar(name, Description=f"bounding boxes of head {res.head} as label blocks", Structures=res.structures)
    return files


def derivative_name_problems(root: str | Path) -> list[str]:
    """Files of the derivative dataset ``root`` whose path no BIDS derivative (or common) rule of the
    schema accepts; dot files and ``.bidsignore`` patterns are left out, as validators do."""
    import fnmatch

    from bidsschematools import rules, schema

    sch = schema.load_schema()
    regexes = [re.compile(r["regex"]) for group in (sch.rules.files.common, sch.rules.files.deriv)
               for r in rules.regexify_filename_rules(group, sch, level=2)]
    root = Path(root)
    ignore = root / ".bidsignore"
    patterns = [p.strip() for p in ignore.read_text(encoding="utf-8").splitlines() if p.strip()] if ignore.is_file() else []
    bad = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if any(fnmatch.fnmatch(rel, p.lstrip("/")) for p in patterns):
            continue
        if not any(rx.fullmatch(rel) for rx in regexes):
            bad.append(rel)
    return bad
