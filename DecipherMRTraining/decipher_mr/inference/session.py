"""The inference session: load a bundle once, encode a volume once, then answer many questions fast.

>>> s = Session.from_bundle("model.zip")
>>> seg = s.segment("t1.nii.gz")                      # encodes (one encoder pass) and decodes
>>> hit = s.ground("t1.nii.gz", "left frontal lobe")  # cache hit: text tower + head only
>>> s.stats["encoder_passes"]
1

A volume is a :class:`~decipher_mr.data.volume.Volume` (an array plus its geometry) or a path that
:func:`~decipher_mr.data.io.read_volume` opens. Each volume is preprocessed with the bundle's
settings, encoded (sliding windows for large volumes, :mod:`.encoding`), and kept in a small LRU
keyed by a hash of its voxels and geometry (a file path is re-read only when the file changed); text
embeddings are cached by query text. Every map is computed on the model's (prepared) grid and mapped
back with :func:`~decipher_mr.data.preprocess.restore` onto the input's exact grid when first asked for
(``result.heatmap``, ``result.labels``); ``result.grid_heatmap`` etc. are the maps on the model grid.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from decipher_mr.data.preprocess import preprocess_volume, restore
from decipher_mr.data.volume import Volume

from .decoding import decoder_logits, token_head_maps
from .encoding import DEFAULT_MAX_TOKENS, EncodedVolume, ProgressFn, TokenCache, encode_prepared, volume_content_hash
from .errors import InferenceError, QueryError
from .results import HeatmapResult, LocalizationResult, RetrievalHit, SegmentationResult, peak_of
from .runtime import as_volume, bundle_fingerprint, file_key, resolve_device, single_thread  # noqa: F401 (re-exported)

MAX_QUERY_CHARS = 1000
TEXT_CACHE_SIZE = 512
IMAGE_EMBEDDINGS_KEPT = 256  # by content key, 2 KiB each: they outlive the (large) dense encodings


class Session:
    """A loaded bundle plus caches. Build with :meth:`from_bundle`.

    >>> s = Session.from_bundle("model.zip", device="auto")
    >>> s.anomaly_map(vol).heatmap.same_geometry(vol)
    True
    """

    def __init__(self, bundle, device: str | torch.device = "auto", precision: str = "auto",
                 max_tokens: int = DEFAULT_MAX_TOKENS, cache_items: int = 4):
        from decipher_mr.models.vit3d import precision_context, resolve_precision

        self.bundle = bundle
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.device, precision)
        self._autocast = lambda: precision_context(self.device, self.precision)
        self.max_tokens = int(max_tokens)
        self.vision = bundle.vision.to(self.device).eval()
        self.model = bundle.model.to(self.device).eval() if bundle.model is not None else None
        self.heads = {n: h.to(self.device).eval() for n, h in bundle.heads.items()}
        self.fingerprint = bundle_fingerprint(bundle)
        # one encoder pass must serve every head, so ask it for every layer any decoder reads
        self.layers = tuple(sorted({int(l) for h in self.heads.values() for l in getattr(h, "required_layers", ())}))
        self.cache = TokenCache(max_items=cache_items)
        self._file_keys: OrderedDict[tuple, str] = OrderedDict()  # (path, mtime, size, inode) -> content key
        self._text_cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._image_embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()  # content key -> embedding
        self._text_towers: dict[str, Any] = {}
        self.stats = {"encoder_passes": 0, "encode_cache_hits": 0, "view_passes": 0,
                      "text_passes": 0, "text_cache_hits": 0}

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                    heads: Sequence[str] | None = None, **kwargs: Any) -> "Session":
        """Verify and load a bundle (folder or zip) and hold it ready.

        >>> s = Session.from_bundle("model.zip", device="cpu")
        """
        from decipher_mr.bundle import load_bundle

        return cls(load_bundle(path, heads=heads), device=device, **kwargs)

    # --- what the bundle offers ---------------------------------------------------------------
    def heads_for(self, task: str) -> list[str]:
        return sorted(n for n, spec in self.bundle.head_specs.items() if spec["task"] == task)

    def describe(self) -> dict[str, Any]:
        """What this session can do (the worker's ``info`` reply)."""
        return {"bundle": str(self.bundle.source), "fingerprint": self.fingerprint, "device": str(self.device),
                "precision": self.precision, "aligned": self.model is not None,
                "heads": {n: {"task": s["task"], "labels": [r.get("name") for r in self.bundle.labels.get(n, [])]}
                          for n, s in self.bundle.head_specs.items()}}

    def _head(self, task: str, name: str | None):
        names = self.heads_for(task)
        if name is None:
            if not names:
                have = ", ".join(f"{n} ({s['task']})" for n, s in sorted(self.bundle.head_specs.items())) or "no heads"
                raise InferenceError(f"{self.bundle.source}: the bundle has no {task} head (it holds: {have})")
            name = names[0]
        elif name not in names:
            raise InferenceError(f"{self.bundle.source}: no {task} head named {name!r} (its {task} heads: "
                                 f"{', '.join(names) or 'none'})")
        return name, self.heads[name]

    # --- encoding -------------------------------------------------------------------------------
    def encode(self, volume: Volume | str | os.PathLike, progress: ProgressFn | None = None) -> EncodedVolume:
        """Preprocess and encode a volume, or return the cached encoding of the same content.

        >>> enc = s.encode("t1.nii.gz"); enc.grid
        """
        key, vol = self._content_key(volume)
        hit = self.cache.get(key)
        if hit is not None:  # the same voxels (an unchanged file is not even read again)
            self.stats["encode_cache_hits"] += 1
            return hit
        return self._encode(key, vol if vol is not None else as_volume(volume), progress)

    def _encode(self, key: str, vol: Volume, progress: ProgressFn | None) -> EncodedVolume:
        """The dense (sliding-window) encoding of a volume whose content key is ``key``, cached."""
        if progress is not None:
            progress("preprocess", 0.0)
        prepared, record = preprocess_volume(vol, self.bundle.preprocess)
        t0 = time.perf_counter()
        cls, tokens, grid, layers, windows = encode_prepared(
            self.vision, prepared, self.layers, self.device, self._autocast, self.max_tokens, progress=progress)
        self.stats["encoder_passes"] += 1
        # geometry only: a zero-stride view, so the cache keeps no copy of the input's voxels
        source = Volume(np.broadcast_to(np.zeros((), np.uint8), vol.shape), vol.spacing, vol.origin, vol.direction,
                        vol.path)
        enc = EncodedVolume(key=key, prepared=prepared, record=record, source=source, cls=cls, patch_tokens=tokens,
                            grid=grid, layers=layers, windows=windows, encode_seconds=time.perf_counter() - t0)
        self.cache.put(enc)
        if progress is not None:
            progress("encode", 1.0)
        return enc

    def image_embedding(self, volume: Volume | str | os.PathLike | EncodedVolume,
                        progress: ProgressFn | None = None) -> torch.Tensor:
        """The unit-norm 512-d image embedding of the view the model was aligned on (the bundle's
        ``image_view``, :mod:`decipher_mr.data.views`), embedded as stage 2 trained and ``evaluate
        retrieval`` measures it: one small encoder pass on the prepared array, cached by content; no dense
        (sliding-window) encoding unless one is cached already. Older bundles pool the dense tokens.

        >>> s.image_embedding("t1.nii.gz").shape
        torch.Size([512])
        """
        model = self._aligned("image embeddings")
        if isinstance(volume, EncodedVolume):
            key, enc, vol = volume.key, volume, None
        else:
            key, vol = self._content_key(volume)
            enc = self.cache.get(key)
            if enc is not None:
                self.stats["encode_cache_hits"] += 1
        if key not in self._image_embeddings:
            view = getattr(model, "image_view", None)
            if not view:  # older bundles: the dense tokens, pooled
                enc = enc or self._encode(key, vol if vol is not None else as_volume(volume), progress)
                with torch.inference_mode():
                    pooled = torch.cat([enc.cls, enc.patch_tokens.mean(0)])[None].to(self.device)
                    vec = model.project_image(pooled)[0].float().cpu()
            elif enc is not None:
                vec = self._view_embedding(enc.prepared, enc.record.grid_spacing, view, model.encode_image)
            else:  # the view needs the prepared array only: no dense pass
                if progress is not None:
                    progress("preprocess", 0.0)
                prepared, record = preprocess_volume(vol if vol is not None else as_volume(volume),
                                                     self.bundle.preprocess)
                vec = self._view_embedding(prepared, record.grid_spacing, view, model.encode_image)
                if progress is not None:
                    progress("encode", 1.0)
            self._image_embeddings[key] = vec
            while len(self._image_embeddings) > IMAGE_EMBEDDINGS_KEPT:
                self._image_embeddings.popitem(last=False)
        self._image_embeddings.move_to_end(key)
        return self._image_embeddings[key]

    def clear_cache(self) -> None:
        """Forget every encoded volume and image embedding (text embeddings stay)."""
        self.cache.clear()
        self._image_embeddings.clear()

    def _content_key(self, volume: Volume | str | os.PathLike) -> tuple[str, Volume | None]:
        """The content hash of a volume, and the volume if it had to be read (``None`` when the same
        unchanged file was hashed before)."""
        fkey = file_key(volume)
        if fkey and fkey in self._file_keys:
            return self._file_keys[fkey], None
        vol = as_volume(volume)
        key = volume_content_hash(vol)
        if fkey:
            self._file_keys[fkey] = key
            while len(self._file_keys) > 64:
                self._file_keys.popitem(last=False)
        return key, vol

    def _view_embedding(self, prepared: np.ndarray, spacing, view: dict[str, Any], embed) -> torch.Tensor:
        """``embed`` of the deterministic image view of a prepared array, float32 on the CPU."""
        from decipher_mr.data.views import image_view

        x = torch.from_numpy(image_view(prepared, spacing, view))[None, None].to(self.device)
        with torch.inference_mode(), self._autocast(), single_thread(self.device):
            out = embed(x)[0].float().cpu()
        self.stats["view_passes"] += 1
        return out

    def image_features(self, volume: Volume | str | os.PathLike, view: dict[str, Any] | None = None) -> torch.Tensor:
        """``cls ⊕ mean(patch tokens)`` of the volume's image view (``view``, else the aligned one, else
        the default), before any projection: what ``evaluate probes`` fits on. No dense encoding."""
        from decipher_mr.data.views import DEFAULT_VIEW

        vol = as_volume(volume)
        prepared, record = preprocess_volume(vol, self.bundle.preprocess)
        view = view or getattr(self.model, "image_view", None) or DEFAULT_VIEW

        def pooled(x: torch.Tensor) -> torch.Tensor:
            out = self.vision(x)
            return torch.cat([out.cls, out.patch_tokens.mean(1)], dim=-1)

        return self._view_embedding(prepared, record.grid_spacing, view, pooled)

    def _aligned(self, what: str):
        if self.model is None:
            raise InferenceError(f"{self.bundle.source}: an image-only bundle (no text tower) cannot give {what}")
        return self.model

    # --- text -----------------------------------------------------------------------------------
    def check_query(self, text: Any) -> str:
        """The query, stripped; :class:`QueryError` when it is not a string, empty or too long."""
        if not isinstance(text, str):
            raise QueryError(f"a text query must be a string, got {type(text).__name__}")
        query = " ".join(text.split())
        if not query:
            raise QueryError("the text query is empty; type what to look for, e.g. 'left frontal lobe'")
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"the text query is too long ({len(query)} characters; at most {MAX_QUERY_CHARS})")
        return query

    def embed_text(self, texts: str | Sequence[str], kind: str = "aligned") -> torch.Tensor:
        """Unit-norm text embeddings (B, 512) from the aligned text tower, cached by text.

        ``kind="aligned"`` (the shared space) is what retrieval and most grounding heads use.

        >>> s.embed_text(["small lesion in the left frontal lobe"]).shape
        torch.Size([1, 512])
        """
        single = isinstance(texts, str)
        queries = [self.check_query(t) for t in ([texts] if single else texts)]
        model = self._aligned("text embeddings")
        missing = [q for q in dict.fromkeys(queries) if (kind, q) not in self._text_cache]
        self.stats["text_cache_hits"] += len(queries) - len(missing)
        if missing:
            for q in missing:
                n_tokens = len(model.text.tokenizer(q, add_special_tokens=True)["input_ids"])
                if n_tokens > model.text.max_length:
                    raise QueryError(f"the text query is too long ({n_tokens} tokens; the text tower reads at most "
                                     f"{model.text.max_length})")
            with torch.inference_mode(), single_thread(self.device):
                vecs = model.encode_reports(missing).float().cpu()
            self.stats["text_passes"] += 1
            for q, v in zip(missing, vecs):
                self._text_cache[(kind, q)] = v
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[(kind, q)] for q in queries])

    def embed_reports(self, reports: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings (B, 512) of whole reports (section-aware truncation, not cached).

        >>> s.embed_reports(["FINDINGS: ... IMPRESSION: normal."]).shape
        torch.Size([1, 512])
        """
        model = self._aligned("report embeddings")
        with torch.inference_mode():
            return model.encode_reports(list(reports)).float().cpu()

    def _grounding_text(self, head, query: str) -> torch.Tensor:
        cfg = head.config
        if self.model is not None and cfg.text_dim == self.model.embed_dim:
            return self.embed_text(query)
        raise InferenceError(f"{self.bundle.source}: the grounding head expects {cfg.text_dim}-d text embeddings from "
                             f"{cfg.text_source or 'another text encoder'}, which this bundle's aligned text tower "
                             "does not produce; re-train the head on the aligned model")

    # --- heads ----------------------------------------------------------------------------------
    def _to_source(self, enc: EncodedVolume, array: np.ndarray, interpolation: str) -> Volume:
        out = restore(array, enc.record, interpolation=interpolation, fill=0.0)
        out.path = None
        return out

    @staticmethod
    def _on_grid(enc: EncodedVolume, array: np.ndarray) -> Volume:
        """A map on the prepared (model) grid with that grid's own geometry (canonical directions)."""
        from decipher_mr.data.preprocess import CANONICAL_DIRECTION_LPS

        rec = enc.record
        return Volume(np.ascontiguousarray(array), tuple(float(v) for v in rec.grid_spacing), rec.prepared_origin,
                      CANONICAL_DIRECTION_LPS.copy())

    def _heatmap_result(self, enc: EncodedVolume, name: str, heat: np.ndarray, threshold: float,
                        query: str | None = None) -> HeatmapResult:
        """Mask, box and peak on the model grid (cheap); the input-grid maps are made on first use only."""
        from decipher_mr.heads.dense import box_from_heatmap, largest_component

        heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
        grid = self._on_grid(enc, heat)
        mask = largest_component(heat >= threshold)
        box = box_from_heatmap(heat, threshold) if heat.max() > 0 else None

        def to_input():
            vol = self._to_source(enc, heat, "linear")
            in_mask = largest_component(vol.array >= threshold)
            in_box = box_from_heatmap(vol.array, threshold) if vol.array.max() > 0 else None
            return vol, vol.with_array(in_mask.astype(np.uint8)), in_box, peak_of(vol)

        return HeatmapResult(name, threshold=threshold, query=query, source=enc.source, to_input=to_input,
                             grid=(grid, grid.with_array(mask.astype(np.uint8)), box, peak_of(grid)))

    def segment(self, volume, head: str | None = None, progress: ProgressFn | None = None) -> SegmentationResult:
        """Label map in the input geometry (made on first use) and on the model grid, from a segmentation head.

        >>> seg = s.segment("t1.nii.gz"); seg.summary()["volume_ml"]
        """
        name, module = self._head("segment", head)
        enc = self.encode(volume, progress)
        with self._autocast():
            logits = decoder_logits(module, enc, self.device, progress)
        labels = logits.argmax(0).numpy().astype(np.uint8)
        del logits
        names = list(module.config.labels)
        return SegmentationResult(name, None, names, grid_labels=self._on_grid(enc, labels),
                                  to_input=lambda: self._to_source(enc, labels, "nearest"),
                                  label_codes=self._label_codes(name, names))

    def _label_codes(self, head: str, names: list[str]) -> list[dict]:
        """Each foreground label's codes from the head's label table (an old table without codes gets
        those of known names, else Tissue/Tissue: ``bundle.codes.label_codes``)."""
        from decipher_mr.bundle.codes import label_codes

        rows = (getattr(self.bundle, "labels", None) or {}).get(head) or [
            {"index": i, "name": n} for i, n in enumerate(names)]
        return [{"value": c.index, "name": c.name, "category": d["category"], "type": d["type"], "coded": c.coded}
                for c in label_codes(rows, where=f"head {head} label table") for d in [c.as_dict()]]

    def anomaly_map(self, volume, head: str | None = None, progress: ProgressFn | None = None,
                    threshold: float = 0.5) -> HeatmapResult:
        """Voxel-wise anomaly map in [0, 1] in the input geometry, with its mask, box and peak.

        >>> amap = s.anomaly_map("t1.nii.gz"); amap.peak_lps
        """
        name, module = self._head("anomaly", head)
        enc = self.encode(volume, progress)
        with self._autocast():
            if getattr(module.config, "mode", "supervised") == "supervised":
                heat = torch.sigmoid(decoder_logits(module, enc, self.device, progress))[0]
            else:
                heat = token_head_maps(module, enc, self.device)[0]
        return self._heatmap_result(enc, name, heat.numpy(), threshold)

    def ground(self, volume, text: str, head: str | None = None, progress: ProgressFn | None = None) -> HeatmapResult:
        """Where ``text`` is in the volume: heatmap in [0, 1], mask, box and peak in the input geometry.

        >>> s.ground("t1.nii.gz", "lesion in the right frontal lobe").box_ijk
        """
        query = self.check_query(text)
        name, module = self._head("ground", head)
        enc = self.encode(volume, progress)
        t = self._grounding_text(module, query).to(self.device)
        with self._autocast(), single_thread(self.device):
            heat = torch.sigmoid(token_head_maps(module, enc, self.device, text=t)[0])
        return self._heatmap_result(enc, name, heat.numpy(), float(module.config.threshold), query)

    def localize(self, volume, head: str | None = None, progress: ProgressFn | None = None,
                 keep_heatmaps: bool = True) -> LocalizationResult:
        """Box, peak and score of every structure a localization head knows, in the input geometry.

        >>> s.localize("t1.nii.gz").structures["frontal"]["box_lps"]
        """
        name, module = self._head("localize", head)
        enc = self.encode(volume, progress)
        with self._autocast():
            heat = torch.sigmoid(token_head_maps(module, enc, self.device))
        result = LocalizationResult(name)
        for label, h in zip(module.config.labels, heat.numpy()):
            r = self._heatmap_result(enc, name, h, float(module.config.threshold))
            result.structures[label] = {"box_ijk": r.box_ijk, "box_lps": r.box_lps, "peak_ijk": r.peak_ijk,
                                        "peak_lps": r.peak_lps, "score": float(r.heatmap.array.max())}
            if keep_heatmaps:
                result.heatmaps[label] = r.heatmap
        return result

    def classify(self, volume, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Outputs of every probe head: class probabilities (classify) or values (regress).

        >>> s.classify("t1.nii.gz")["region"]["prediction"]
        """
        names = self.heads_for("classify") + self.heads_for("regress")
        enc = self.encode(volume, progress)
        out: dict[str, Any] = {}
        with torch.inference_mode(), self._autocast():
            for n in names:
                module = self.heads[n]
                y = module(enc.output())[0].float().cpu()
                labels = list(module.config.labels)
                if self.bundle.head_specs[n]["task"] == "classify":
                    p = torch.softmax(y, 0)
                    out[n] = {"task": "classify", "prediction": labels[int(p.argmax())],
                              "probabilities": {lab: round(float(v), 6) for lab, v in zip(labels, p)}}
                else:
                    out[n] = {"task": "regress", "values": {lab: float(v) for lab, v in zip(labels, y)}}
        return out

    # --- retrieval ------------------------------------------------------------------------------
    def retrieve_reports(self, volume, reports: Sequence[str] | None = None, index=None, k: int = 5,
                         exact: bool = False, progress: ProgressFn | None = None) -> list[RetrievalHit]:
        """The reports closest to the volume in the shared space: from a list of report texts, or from
        the report embeddings of a retrieval index (path or :class:`~decipher_mr.index.VectorIndex`).

        >>> hits = s.retrieve_reports("t1.nii.gz", index="demo/index", k=3); hits[0].metadata["study_id"]
        """
        img = self.image_embedding(volume, progress)
        if reports is not None:
            if not len(reports):
                raise InferenceError("no reports to rank")
            txt = self.embed_text(list(reports))
            scores = (txt @ img).numpy()
            order = np.argsort(-scores, kind="stable")[: max(1, int(k))]
            return [RetrievalHit(r + 1, float(scores[i]), int(i)) for r, i in enumerate(order)]
        return self._search_index(index, img, "report", k, exact)

    def retrieve_cases(self, volume, index, k: int = 5, exact: bool = False,
                       progress: ProgressFn | None = None) -> list[RetrievalHit]:
        """The indexed studies whose images are closest to this volume.

        >>> s.retrieve_cases("t1.nii.gz", "demo/index", k=5)[0].metadata["image"]
        """
        return self._search_index(index, self.image_embedding(volume, progress), "image", k, exact)

    def search_text(self, text: str, index, k: int = 10, space: str = "image", exact: bool = False) -> list[RetrievalHit]:
        """Studies (``space="image"``) or reports (``"report"``) of an index closest to a text query."""
        return self._search_index(index, self.embed_text(text)[0], space, k, exact)

    def _search_index(self, index, query: torch.Tensor, space: str, k: int, exact: bool) -> list[RetrievalHit]:
        from decipher_mr.index import VectorIndex

        if index is None:
            raise InferenceError("retrieval needs an index (decipher-mr index build) or a list of reports")
        idx = index if isinstance(index, VectorIndex) else VectorIndex.open(Path(index))
        idx.check_fingerprint(self.fingerprint, str(self.bundle.source))
        return idx.search(query.numpy()[None], k=k, space=space, exact=exact)[0]
