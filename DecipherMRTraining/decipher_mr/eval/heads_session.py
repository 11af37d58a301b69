"""Task heads evaluated through the path users run: a :class:`~decipher_mr.inference.session.Session`
loaded from an exported bundle, on the manifest's own files, with 95% bootstrap intervals by study.

For every row of the chosen split(s) the volume is read as a user would read it and handed to the
session (one encoder pass serves every head):

* **segment** - ``Session.segment`` in the input geometry vs the row's ``regions`` map merged into the
  head's label groups (the bundle's ``groups``); Dice per label and the per-item mean Dice. Baseline:
  the majority-label map (the most common label of the evaluated items painted over the whole body
  mask); an empty mask scores 0.
* **anomaly** - ``Session.anomaly_map``: voxel AUROC inside the body mask per lesion-bearing study
  (chance 0.5), and the study-level AUROC of the map's peak (lesion vs normal studies).
* **ground** - a query built from the row's lesion *metadata* (``labels.lesion_type`` and
  ``labels.lesion_location``, the words the demo reports use: "wedge-shaped infarct in the right
  superior temporal pole"); never from report text. Pointing hit (peak inside the lesion; baseline:
  the centre voxel), side correct (peak on the named side of the midline; chance 0.5) and the distance
  from the peak to the lesion centroid in mm (median; baseline: the centre voxel's distance). On maps
  with sided region names (AAL), the largest left and right regions are queried by name too ("left
  precentral gyrus"): peak inside that region (baseline: centre voxel) and on its side (chance 0.5).

Sides are judged in RAS (``x_ras = -x_lps``, +x = patient right); the midline is the mid-point of the
left and right AAL regions' centroids when the row has an AAL map, else the body mask's centroid.
A row that cannot be read is reported (id, field, message) and the rest go on.
"""

from __future__ import annotations

import csv
import fnmatch
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from decipher_mr.data.volume import Volume
from decipher_mr.eval import stats

DEFAULT_QUERY = "{words} in the {location}"
MAX_AUROC_VOXELS = 400_000


class RowError(Exception):
    """A manifest row that cannot be evaluated; ``field`` names the offending key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# --- reading one row ------------------------------------------------------------------------------
def _read(path: str | None, field: str, allow_constant: bool = False) -> Volume:
    from decipher_mr.data.io import read_volume

    if not path:
        raise RowError("missing", field)
    if not Path(path).exists():
        raise RowError(f"{path}: file does not exist", field)
    try:
        return read_volume(path, allow_constant=allow_constant)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported by row and field
        raise RowError(f"{path}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                       field) from None


def on_grid(image: Volume, other: Volume) -> np.ndarray:
    """``other``'s voxels on ``image``'s grid (nearest neighbour; as is when the geometry matches)."""
    if image.same_geometry(other):
        return np.asarray(other.array)
    import SimpleITK as sitk

    out = sitk.Resample(other.to_sitk(), image.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def region_table(row, base: Path) -> dict[int, str]:
    """Label value -> name of the row's ``regions`` map (its ``region_labels`` CSV; AAL for brains)."""
    rel = row.extra.get("region_labels")
    if rel:
        p = Path(rel) if Path(rel).is_absolute() else base / rel
        if not p.is_file():
            raise RowError(f"{p}: region table does not exist", "region_labels")
        with open(p, newline="", encoding="utf-8") as fh:
            return {int(r["value"]): r["name"] for r in csv.DictReader(fh)}
    if row.body_region == "brain":
        from decipher_mr.assets import aal_region_names

        return {0: "background", **aal_region_names()}
    raise RowError("no region table for the regions map", "region_labels")


def group_labels(regions: np.ndarray, names: dict[int, str], groups: dict[str, list[str]]) -> np.ndarray:
    """The label map merged into groups 1..G by name patterns (0 elsewhere), as the head was trained."""
    top = max(int(regions.max()) if regions.size else 0, max(names, default=0)) + 1
    lut = np.zeros(top, np.uint8)
    for gi, patterns in enumerate(groups.values(), start=1):
        for value, name in names.items():
            if value and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                lut[value] = gi
    return lut[np.clip(np.asarray(regions, np.int64), 0, top - 1)]


def body_mask(image: Volume, tissue: np.ndarray | None) -> np.ndarray:
    """The tissue map's foreground when the row has one, else voxels above 10% of the 99th percentile."""
    if tissue is not None:
        return tissue > 0
    arr = np.asarray(image.array, np.float32)
    return arr > 0.1 * float(np.percentile(arr, 99))


def world(volume: Volume, ijk) -> np.ndarray:
    """LPS millimetres of voxel index (or indices, (N, 3)) ``ijk``."""
    ijk = np.atleast_2d(np.asarray(ijk, np.float64))
    return (volume.affine_lps[:3, :3] @ ijk.T).T + volume.affine_lps[:3, 3]


def centroid_lps(volume: Volume, mask: np.ndarray) -> np.ndarray:
    return world(volume, np.argwhere(mask).mean(0))[0]


def midline_x_ras(image: Volume, regions: np.ndarray | None, names: dict[int, str] | None,
                  body: np.ndarray) -> tuple[float, str]:
    """RAS x of the midline: between the AAL left and right regions' centroids, else the body's centroid."""
    if regions is not None and names:
        left = [v for v, n in names.items() if n.endswith("_L")]
        right = [v for v, n in names.items() if n.endswith("_R")]
        ml, mr = np.isin(regions, left), np.isin(regions, right)
        if ml.any() and mr.any():
            return float(-(centroid_lps(image, ml)[0] + centroid_lps(image, mr)[0]) / 2), "left/right regions"
    return float(-centroid_lps(image, body)[0]), "body centroid"


def named_side(location: str) -> str | None:
    """``"left"`` or ``"right"`` when the location names one side only."""
    words = set(re.findall(r"[a-z]+", location.lower()))
    sides = words & {"left", "right"}
    return next(iter(sides)) if len(sides) == 1 else None


def side_of(x_ras: float, midline: float) -> str:
    return "right" if x_ras > midline else "left"  # RAS: +x is the patient's right


def lesion_query(labels: dict[str, Any], template: str = DEFAULT_QUERY) -> str | None:
    """The grounding query for a row's lesion from its metadata (None without a lesion or location)."""
    kind, location = labels.get("lesion_type"), labels.get("lesion_location")
    if not labels.get("lesion_present") or not kind or kind == "none" or not location:
        return None
    try:
        from decipher_mr.data.demo.lesions import LESION_TYPES

        words = LESION_TYPES[kind].words if kind in LESION_TYPES else str(kind).replace("_", " ")
    except ImportError:  # pragma: no cover - the demo generator is optional at run time
        words = str(kind).replace("_", " ")
    return template.format(words=words, location=location, kind=str(kind).replace("_", " "))


def dice_per_label(pred: np.ndarray, truth: np.ndarray, n_labels: int) -> list[float]:
    """Dice of labels 1..n_labels-1 (NaN where both maps lack the label)."""
    out = []
    for lab in range(1, n_labels):
        p, t = pred == lab, truth == lab
        den = int(p.sum()) + int(t.sum())
        out.append(float("nan") if den == 0 else 2.0 * int((p & t).sum()) / den)
    return out


# --- evaluating one row ---------------------------------------------------------------------------
def evaluate_row(session, row, base: Path, tasks: dict[str, str], template: str) -> dict[str, Any]:
    """Every applicable head on one manifest row; raises :class:`RowError` for an unusable row."""
    from decipher_mr.eval.head_metrics import roc_auc

    image = _read(row.image, "image")
    rec: dict[str, Any] = {"id": row.id, "study": row.study_id or row.id, "body_region": row.body_region}
    tissue_path = row.extra.get("tissue")
    tissue = None
    if tissue_path:
        p = Path(tissue_path) if Path(tissue_path).is_absolute() else base / tissue_path
        tissue = on_grid(image, _read(str(p), "tissue", allow_constant=True))
    body = body_mask(image, tissue)
    lesion = None
    if row.mask:
        lesion = on_grid(image, _read(row.mask, "mask", allow_constant=True)) > 0
    present = row.labels.get("lesion_present")
    if lesion is not None and present is not None and bool(present) != bool(lesion.any()):
        raise RowError(f"labels.lesion_present={present} but the mask is {'not ' if lesion.any() else ''}empty", "mask")
    regions = names = None
    if row.regions:
        regions = on_grid(image, _read(row.regions, "regions", allow_constant=True))
        names = region_table(row, base)

    if "segment" in tasks and regions is not None:
        groups = session.bundle.head_specs[tasks["segment"]]["config"].get("groups") or {}
        truth = group_labels(regions, names, groups) if groups else None
        if truth is not None and truth.any():
            seg = session.segment(image, head=tasks["segment"])
            pred = np.asarray(seg.labels.array)
            n = len(seg.label_names)
            d = dice_per_label(pred, truth, n)
            counts = [(int(((truth == l) & body).sum()), int((truth == l).sum())) for l in range(1, n)]
            rec["segment"] = {"dice": d, "mean_dice": float(np.nanmean(d)), "labels": seg.label_names[1:],
                              "truth_in_body": counts, "body_voxels": int(body.sum())}

    if "anomaly" in tasks and lesion is not None:
        amap = session.anomaly_map(image, head=tasks["anomaly"])
        heat = np.asarray(amap.heatmap.array, np.float32)
        keep = body | lesion
        a: dict[str, Any] = {"lesion": bool(lesion.any()), "peak_score": float(heat[keep].max())}
        if lesion.any():
            s, y = heat[keep], lesion[keep]
            if s.size > MAX_AUROC_VOXELS:
                pick = np.union1d(np.random.default_rng(0).choice(s.size, MAX_AUROC_VOXELS, replace=False),
                                  np.flatnonzero(y))
                s, y = s[pick], y[pick]
            a["voxel_auroc"] = roc_auc(s, y)
        rec["anomaly"] = a

    query = lesion_query(row.labels, template) if lesion is not None and lesion.any() else None
    if "ground" in tasks and query is not None:
        g = session.ground(image, query, head=tasks["ground"])
        peak = [int(v) for v in g.peak_ijk]
        centre = [s // 2 for s in image.shape]
        c = centroid_lps(image, lesion)
        peak_lps, centre_lps = world(image, peak)[0], world(image, centre)[0]
        gr: dict[str, Any] = {"query": query, "hit": float(lesion[tuple(peak)]),
                              "centre_hit": float(lesion[tuple(centre)]),
                              "distance_mm": float(np.linalg.norm(peak_lps - c)),
                              "centre_distance_mm": float(np.linalg.norm(centre_lps - c)),
                              "peak_lps": [float(v) for v in peak_lps]}
        side = named_side(str(row.labels.get("lesion_location", "")))
        if side is not None:
            mid, how = midline_x_ras(image, regions, names, body)
            gr.update(side=side, midline_x_ras=mid, midline_from=how,
                      side_correct=float(side_of(-peak_lps[0], mid) == side),
                      lesion_side_agrees=side_of(-c[0], mid) == side)
        rec["ground"] = gr
    if "ground" in tasks and regions is not None and names:
        structures = structure_queries(regions, names)
        if structures:
            mid, _ = midline_x_ras(image, regions, names, body)
            centre = tuple(s // 2 for s in image.shape)
            rec["ground_structures"] = []
            for value, side, query in structures:
                g = session.ground(image, query, head=tasks["ground"])
                peak = [int(v) for v in g.peak_ijk]
                rec["ground_structures"].append(
                    {"query": query, "side": side, "hit": float(regions[tuple(peak)] == value),
                     "centre_hit": float(regions[centre] == value),
                     "side_correct": float(side_of(-world(image, peak)[0][0], mid) == side)})
    return rec


def structure_queries(regions: np.ndarray, names: dict[int, str]) -> list[tuple[int, str, str]]:
    """(value, side, query) for the largest left and the largest right named region of a map with sides."""
    counts = np.bincount(np.asarray(regions, np.int64).ravel())
    out = []
    for suffix, side in (("_L", "left"), ("_R", "right")):
        cands = [(int(counts[v]), v) for v, n in names.items() if n.endswith(suffix) and 0 < v < len(counts)]
        cands = [c for c in cands if c[0] > 0]
        if cands:
            value = max(cands)[1]
            try:
                from decipher_mr.data.demo.anatomy import aal_name_in_words

                words = aal_name_in_words(names[value])
            except ImportError:  # pragma: no cover
                words = names[value].replace("_", " ")
            out.append((value, side, words))
    return out


# --- the whole split ------------------------------------------------------------------------------
def evaluate_heads_session(session, manifest: str | Path, splits: Sequence[str] = ("test",),
                           template: str = DEFAULT_QUERY, n_boot: int = 1000, seed: int = 0,
                           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the session's segment/anomaly/ground heads on the manifest rows of ``splits``.

    >>> s = Session.from_bundle("demo/bundle.zip", device="cpu")
    >>> result = evaluate_heads_session(s, "demo/data/manifest.jsonl", ["test"])
    >>> result["figures"]["ground.pointing"]["value"], result["figures"]["ground.pointing"]["ci"]
    """
    from decipher_mr.data.manifest import read_manifest
    from decipher_mr.inference import InferenceError

    manifest = Path(manifest)
    rows, bad = read_manifest(manifest, strict=False)
    errors = [{"row": e.line, "id": None, "field": e.field, "error": str(e)} for e in bad]
    wanted = [r for r in rows if ("all" in splits or r.split in splits)]
    tasks = {t: session.heads_for(t)[0] for t in ("segment", "anomaly", "ground") if session.heads_for(t)}
    records = []
    before = dict(session.stats)
    for i, row in enumerate(wanted, 1):
        if progress:
            progress(f"[{i}/{len(wanted)}] {row.id}")
        try:
            records.append(evaluate_row(session, row, manifest.resolve().parent, tasks, template))
        except (RowError, InferenceError) as exc:
            errors.append({"row": row.line, "id": row.id, "field": getattr(exc, "field", None), "error": str(exc)})
            if progress:
                progress(f"  skipped {row.id}: field {getattr(exc, 'field', None)!r}: {exc}")
    used = {k: session.stats[k] - before.get(k, 0) for k in session.stats}
    result = {"manifest": str(manifest), "splits": list(splits), "bundle": str(session.bundle.source),
              "fingerprint": session.fingerprint, "heads": tasks, "query_template": template,
              "rows": len(wanted), "evaluated": len(records), "errors": errors, "session_stats": used,
              "n_boot": n_boot, "seed": seed, "items": records}
    result["figures"] = figures(records, n_boot=n_boot, seed=seed)
    return result


def _est(values, groups, chance, n_boot, seed, **kw):
    return stats.mean_estimate(values, groups, chance, n_boot=n_boot, seed=seed, **kw)


def figures(records: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every figure with its 95% interval by study, count, chance/baseline and verdict."""
    from decipher_mr.eval.head_metrics import roc_auc

    out: dict[str, dict[str, Any]] = {}
    kw = {"n_boot": n_boot, "seed": seed}
    seg = [r for r in records if "segment" in r]
    if seg:
        groups = [r["study"] for r in seg]
        labels = seg[0]["segment"]["labels"]
        totals = np.sum([[c[1] for c in r["segment"]["truth_in_body"]] for r in seg], axis=0)
        major = int(np.argmax(totals))  # the majority label over the evaluated items
        base = []
        for r in seg:
            s = r["segment"]
            d = []
            for li, (inside, total) in enumerate(s["truth_in_body"]):
                if li == major:
                    den = total + s["body_voxels"]
                    d.append(2.0 * inside / den if den else float("nan"))
                else:
                    d.append(0.0 if total else float("nan"))
            base.append(float(np.nanmean(d)))
        b = float(np.mean(base))
        out["segment.majority_map_dice"] = _est(base, groups, None, **kw)
        out["segment.majority_map_dice"]["label"] = labels[major]
        out["segment.mean_dice"] = _est([r["segment"]["mean_dice"] for r in seg], groups, b, **kw)
        for li, name in enumerate(labels):
            vals = [r["segment"]["dice"][li] for r in seg]
            out[f"segment.dice.{name}"] = _est(vals, groups, 0.0, **kw)
    an = [r for r in records if "anomaly" in r]
    les = [r for r in an if "voxel_auroc" in r["anomaly"]]
    if les:
        out["anomaly.voxel_auroc"] = _est([r["anomaly"]["voxel_auroc"] for r in les], [r["study"] for r in les], 0.5,
                                          **kw)
    if an and any(r["anomaly"]["lesion"] for r in an) and not all(r["anomaly"]["lesion"] for r in an):
        score = np.array([r["anomaly"]["peak_score"] for r in an])
        y = np.array([r["anomaly"]["lesion"] for r in an])
        out["anomaly.study_auroc"] = stats.estimate(lambda idx: roc_auc(score[idx], y[idx]),
                                                    [r["study"] for r in an], 0.5, **kw)
    gr = [r for r in records if "ground" in r]
    if gr:
        groups = [r["study"] for r in gr]
        centre = [r["ground"]["centre_hit"] for r in gr]
        out["ground.centre_point_hit"] = _est(centre, groups, None, **kw)
        out["ground.pointing"] = _est([r["ground"]["hit"] for r in gr], groups, float(np.mean(centre)), **kw)
        cd = [r["ground"]["centre_distance_mm"] for r in gr]
        out["ground.centre_distance_mm"] = stats.median_estimate(cd, groups, None, **kw)
        out["ground.distance_mm"] = stats.median_estimate([r["ground"]["distance_mm"] for r in gr], groups,
                                                          float(np.median(cd)), higher_is_better=False, **kw)
        sided = [r for r in gr if "side_correct" in r["ground"]]
        if sided:
            out["ground.side_correct"] = _est([r["ground"]["side_correct"] for r in sided],
                                              [r["study"] for r in sided], 0.5, **kw)
    st = [(r["study"], g) for r in records for g in r.get("ground_structures", [])]
    if st:
        groups = [s for s, _ in st]
        centre = [g["centre_hit"] for _, g in st]
        out["ground_structure.centre_point_hit"] = _est(centre, groups, None, **kw)
        out["ground_structure.pointing"] = _est([g["hit"] for _, g in st], groups, float(np.mean(centre)), **kw)
        out["ground_structure.side_correct"] = _est([g["side_correct"] for _, g in st], groups, 0.5, **kw)
    return out


SUMMARY = (("segment.mean_dice", "segment: mean Dice per study"),
           ("anomaly.voxel_auroc", "anomaly: voxel AUROC (lesion studies)"),
           ("anomaly.study_auroc", "anomaly: study AUROC (peak score)"),
           ("ground.pointing", "grounding: peak inside lesion"),
           ("ground.side_correct", "grounding: peak on the named side"),
           ("ground.distance_mm", "grounding: peak to lesion centre, median mm"),
           ("ground_structure.pointing", "grounding: peak inside the named region"),
           ("ground_structure.side_correct", "grounding: region query, peak on its side"))


def summary_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(figure name, estimate) pairs for the one-table summary ``make demo`` prints."""
    figs = result.get("figures", {})
    return [(title, figs[key]) for key, title in SUMMARY if key in figs]


def report_markdown(result: dict[str, Any]) -> str:
    """heads.md: numbers only (no report text, no queries)."""
    lines = ["# Task heads through the served path (Session on the exported bundle)", "",
             f"Bundle fingerprint `{result['fingerprint']}`; split(s) {', '.join(result['splits'])}: "
             f"{result['evaluated']} of {result['rows']} rows evaluated; {len(result['errors'])} row error(s); "
             f"encoder passes {result['session_stats'].get('encoder_passes', 0)}. 95% percentile bootstrap over "
             f"studies ({result['n_boot']} draws, seed {result['seed']}); chance = chance level or trivial baseline.",
             "", *stats.TABLE_HEAD]
    for key, e in result["figures"].items():
        digits = 1 if key.endswith("_mm") else 3
        lines.append(stats.table_row(key, e, digits))
    if result["errors"]:
        lines += ["", "## Rows not evaluated", ""]
        lines += [f"- line {e['row']} ({e['id'] or 'unparsed'}): field {e['field']!r}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_heads_session_report(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write heads.json and heads.md into ``out`` atomically."""
    from decipher_mr.storage import atomic_write_json, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "heads.json", out / "heads.md"
    atomic_write_json(js, _jsonable(result))
    atomic_write_text(md, report_markdown(result))
    return js, md


def print_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
