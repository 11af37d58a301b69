"""The bundle's MODEL_CARD.md, rendered from its ``config.json`` so the two never disagree."""

from __future__ import annotations

import json
from typing import Any


def _millions(n: Any) -> str:
    return f"{n / 1e6:.2f} M" if isinstance(n, (int, float)) else "unknown"


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    out = []
    for key, value in sorted(metrics.items()):
        shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
        out.append(f"  - {key}: {shown}")
    return out


def render_model_card(config: dict[str, Any]) -> str:
    """Markdown model card for a bundle's config (training data, metrics, intended use).

    >>> print(render_model_card(json.loads(Path("bundle/config.json").read_text())))
    """
    vision = config["vision"]
    vcfg = vision["config"]
    pre = config["preprocess"]
    training = config.get("training") or {}
    lines = [
        f"# {config.get('name', 'decipher-mr')} — DecipherMR model bundle",
        "",
        "## Intended use",
        "",
        "**Research use only. This model is not a medical device and must not be used for diagnosis, "
        "treatment or any other clinical decision.** It encodes 3D MRI volumes (and, when aligned, "
        "radiology-style text) into features for research on retrieval, zero-shot classification and "
        "light task heads.",
        "",
        "## What the bundle holds",
        "",
        f"- Bundle format version {config['format_version']}, written by decipher-mr "
        f"{config.get('decipher_mr_version', '?')} on {config.get('created', '?')}.",
        f"- Vision encoder: 3D ViT `{vcfg.get('name', 'custom')}`, {vcfg.get('embed_dim')}-d, "
        f"{vcfg.get('depth')} layers, {vcfg.get('num_heads')} heads, patches {vision.get('patch_size')}, "
        f"position grid {vision['position_grid']['grid']} resized trilinearly to any input grid; "
        f"{_millions(vision.get('parameters'))} parameters.",
    ]
    if config.get("text"):
        text, align = config["text"], config["alignment"]
        lines.append(
            f"- Text tower: BERT-family encoder (from `{text.get('source') or 'unknown'}`), "
            f"{text.get('hidden_size')}-d, {text['pooling']} pooling, at most {text['max_length']} tokens; "
            f"{_millions(text.get('parameters'))} parameters."
        )
        lines.append(f"- Image and text projections into a shared {align['embed_dim']}-d space (L2-normalised).")
    else:
        lines.append("- No text tower: this bundle encodes images only.")
    heads = config.get("heads") or {}
    if heads:
        lines.append("- Heads on the frozen encoder:")
        for name, spec in sorted(heads.items()):
            lines.append(f"  - `{name}`: {spec['task']}, {spec.get('classes', '?')} labels (`{spec['labels']}`)")
    lines += [
        "",
        "## Input",
        "",
        f"- Orientation: {config['orientation']}+ voxel axes (series are reoriented before encoding).",
        f"- Spacing: {pre.get('target_spacing') or 'native'} mm.",
        f"- Intensity: clipped to percentiles {pre.get('clip_percentiles')}, scaled by `{pre.get('scale')}`; "
        f"foreground crop {'on' if pre.get('crop_foreground') else 'off'}.",
        "",
        "## Training data",
        "",
    ]
    data = training.get("data")
    if data:
        lines.append(f"- {data}")
    else:
        lines.append("- Not recorded by the export. If this bundle was trained on the offline demo corpus, that "
                     "corpus is a handful of real anatomies (Colin27, MNI152) with augmentation, generated "
                     "lesions and generated reports: it is not enough for a clinically meaningful model.")
    for stage in ("vision", "align"):
        if training.get(stage):
            lines.append(f"- {stage}: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in sorted(training[stage].items())))
    lines += ["", "## Metrics", ""]
    any_metrics = False
    for name, spec in sorted(heads.items()):
        if spec.get("metrics"):
            any_metrics = True
            lines.append(f"- head `{name}`:")
            lines += _metric_lines(spec["metrics"])
    if training.get("metrics"):
        any_metrics = True
        lines.append("- encoder / alignment:")
        lines += _metric_lines(training["metrics"])
    if not any_metrics:
        lines.append("- No evaluation metrics were recorded with this export.")
    lines += [
        "",
        "## Limitations",
        "",
        "- Behaviour outside the training distribution (other scanners, sequences, body regions, "
        "pathologies) is unknown.",
        "- Text embeddings reflect the reports the model saw; generated reports are not real clinical language.",
        "",
    ]
    return "\n".join(lines)
