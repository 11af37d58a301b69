"""What heads train on: targets read from the prepared cache, and encoder features computed once.

Targets come from cache fields: ``body_region``/``sequence`` or any ``labels`` key for probes, the
lesion mask (``target="lesion"``) or the anatomical label map (``target="regions"``, merged into a
few classes by name patterns) for dense heads, and (phrase, region) pairs for grounding (AAL or
phantom region names in words, and lesion descriptions).

Frozen-encoder training runs the encoder once per item (:func:`extract_features`); the result can be
kept on disk under a key of the encoder weights, view size and layers, so a second run starts at
once. With ``unfreeze_last=K`` the cache holds the hidden state entering block ``depth-K`` and the
trainer runs only the last ``K`` blocks.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from decipher_mr.data.cache import CacheItem, PreparedCache
from decipher_mr.heads.dense import centre_view

# Merged AAL lobes: a handful of large, named structures for segmentation and localization demos.
AAL_LOBES: dict[str, list[str]] = {
    "frontal lobe": ["Frontal_*", "Precentral_*", "Rectus_*", "Olfactory_*", "Supp_Motor_Area_*", "Paracentral_Lobule_*"],
    "parietal lobe": ["Parietal_*", "Postcentral_*", "SupraMarginal_*", "Angular_*", "Precuneus_*"],
    "temporal lobe": ["Temporal_*", "Heschl_*", "Hippocampus_*", "ParaHippocampal_*", "Amygdala_*", "Fusiform_*"],
    "occipital lobe": ["Occipital_*", "Calcarine_*", "Cuneus_*", "Lingual_*"],
    "cerebellum": ["Cerebelum_*", "Vermis_*"],
    "deep grey matter": ["Caudate_*", "Putamen_*", "Pallidum_*", "Thalamus_*"],
}


def item_value(item: CacheItem, key: str) -> Any:
    """A cache field by name: an item attribute (``body_region``, ``sequence``) or a ``labels`` key."""
    if key in ("body_region", "sequence", "split", "study_id"):
        return getattr(item, key)
    return item.labels.get(key)


def region_names(cache: PreparedCache, item: CacheItem) -> dict[int, str]:
    """Label value -> name for the item's ``regions`` map (its ``region_labels`` CSV, or AAL for brains)."""
    rel = item.extra.get("region_labels")
    candidates = []
    if rel:
        p = Path(rel)
        candidates = [p] if p.is_absolute() else [cache.root / p]
        if item.source:
            candidates += [parent / p for parent in Path(item.source).parents]
    for c in candidates:
        if c.is_file():
            with open(c, newline="", encoding="utf-8") as fh:
                return {int(r["value"]): r["name"] for r in csv.DictReader(fh)}
    if item.body_region == "brain":
        from decipher_mr.assets import aal_region_names

        return {0: "background", **aal_region_names()}
    raise FileNotFoundError(f"{cache.root}: item {item.id} has no readable region table (region_labels={rel!r})")


def load_regions(cache: PreparedCache, i: int) -> np.ndarray | None:
    rel = cache.items[i].extra.get("regions")
    return None if rel is None else np.load(cache.root / rel, mmap_mode="r", allow_pickle=False)


def grouped_labels(regions: np.ndarray, names: dict[int, str], groups: dict[str, list[str]]) -> np.ndarray:
    """Map a label map onto group indices 1..G (0 elsewhere) by name patterns.

    >>> grouped_labels(regions, region_names(cache, item), {"frontal lobe": ["Frontal_*"]})
    """
    lut = np.zeros(max(int(regions.max()) + 1, max(names) + 1 if names else 1), dtype=np.uint8)
    for gi, patterns in enumerate(groups.values(), start=1):
        for value, name in names.items():
            if value and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                lut[value] = gi
    return lut[np.asarray(regions, dtype=np.int64)]


def lesion_words(item: CacheItem) -> str | None:
    """The phrase a report would use for the item's lesion (``None`` when there is none)."""
    kind = item.labels.get("lesion_type")
    if not item.labels.get("lesion_present") or not kind or kind == "none":
        return None
    try:
        from decipher_mr.data.demo.lesions import LESION_TYPES

        return LESION_TYPES[kind].words if kind in LESION_TYPES else kind.replace("_", " ")
    except ImportError:  # pragma: no cover - the demo generator is optional at run time
        return kind.replace("_", " ")


def region_words(name: str, body_region: str | None) -> str:
    if body_region == "brain":
        from decipher_mr.data.demo.anatomy import aal_name_in_words

        return aal_name_in_words(name)
    return name.replace("_", " ")


def grounding_pairs(cache: PreparedCache, i: int, size: Sequence[int], min_voxels: int = 60,
                    max_regions: int = 24) -> list[tuple[str, np.ndarray]]:
    """(phrase, boolean mask on the view) pairs of one item: lesion description and named regions."""
    item = cache.items[i]
    pairs: list[tuple[str, np.ndarray]] = []
    words = lesion_words(item)
    mask = cache.load_mask(i)
    if words and mask is not None:
        m = centre_view(np.asarray(mask) > 0, size)[0]
        if m.any():
            pairs.append((words, m))
    regions = load_regions(cache, i)
    if regions is None:
        return pairs
    names = region_names(cache, item)
    view = centre_view(np.asarray(regions), size)[0]
    counts = np.bincount(view.ravel().astype(np.int64))
    big = [v for v in np.argsort(-counts) if v and v < len(counts) and counts[v] >= min_voxels and v in names]
    for v in big[:max_regions]:
        pairs.append((region_words(names[int(v)], item.body_region), view == v))
    return pairs


@dataclass
class ItemFeatures:
    """One item's encoder pass on its training view (tensors on CPU, float32)."""

    index: int
    image: torch.Tensor  # (1, X, Y, Z)
    cls: torch.Tensor  # (D,)
    tokens: torch.Tensor  # (N, D)
    grid: tuple[int, int, int]
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # (1 + R + N, D) entering the first trainable block


def encoder_key(encoder: torch.nn.Module, size: Sequence[int], layers: Sequence[int], unfreeze_last: int) -> str:
    """A digest of the encoder weights and the extraction settings (the feature-cache key)."""
    h = hashlib.sha256(json.dumps([list(size), sorted(layers), unfreeze_last]).encode())
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(encoder, cache: PreparedCache, indices: Sequence[int], size: Sequence[int],
                     layers: Sequence[int] = (), unfreeze_last: int = 0, device: str | torch.device = "cpu",
                     store: str | Path | None = None, progress: bool = True) -> list[ItemFeatures]:
    """Encode each item's centred ``size`` view once; optionally keep the result under ``store``.

    >>> feats = extract_features(encoder, cache, cache.indices(split="train"), (64, 80, 64), layers=(1, 2))
    """
    from safetensors.torch import load_file, save_file

    from decipher_mr.storage import atomic_path

    encoder.eval()
    depth = len(encoder.blocks)
    first_trainable = depth - unfreeze_last
    frozen_layers = tuple(l for l in layers if l <= first_trainable)
    folder = Path(store) / encoder_key(encoder, size, layers, unfreeze_last) if store else None
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if unfreeze_last > 0:
        hook = encoder.blocks[first_trainable].register_forward_pre_hook(
            lambda _m, args: captured.__setitem__("hidden", args[0].detach()))
    out_list: list[ItemFeatures] = []
    from tqdm.auto import tqdm

    try:
        for i in tqdm(list(indices), desc="encoding (frozen features)", disable=not progress, leave=False):
            item = cache.items[i]
            path = folder / f"{item.id}.safetensors" if folder else None
            try:
                view = centre_view(np.asarray(cache.load(i), dtype=np.float32), size)[0]
            except Exception as exc:
                raise RuntimeError(f"{cache.root / item.array}: cannot read item {item.id} ({exc})") from exc
            image = torch.from_numpy(view)[None]
            if path is not None and path.exists():
                t = load_file(str(path))
                grid = tuple(int(g) for g in t.pop("grid").tolist())
                feats = ItemFeatures(i, image, t.pop("cls"), t.pop("tokens"), grid,  # type: ignore[arg-type]
                                     hidden=t.pop("hidden", None),
                                     layers={int(k.split(".")[1]): v for k, v in t.items() if k.startswith("layer.")})
                out_list.append(feats)
                continue
            out = encoder(image[None].to(device), return_layers=frozen_layers)
            feats = ItemFeatures(i, image, out.cls[0].float().cpu(), out.patch_tokens[0].float().cpu(), tuple(out.grid),
                                 layers={l: v[0].float().cpu() for l, v in out.layers.items()},
                                 hidden=captured["hidden"][0].float().cpu() if unfreeze_last > 0 else None)
            if path is not None:
                tensors = {"cls": feats.cls, "tokens": feats.tokens, "grid": torch.tensor(feats.grid)}
                tensors.update({f"layer.{l}": v for l, v in feats.layers.items()})
                if feats.hidden is not None:
                    tensors["hidden"] = feats.hidden
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path, suffix=".safetensors") as tmp:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            out_list.append(feats)
    finally:
        if hook is not None:
            hook.remove()
    return out_list
