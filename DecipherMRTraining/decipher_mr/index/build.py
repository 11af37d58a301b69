"""Building a retrieval index from a manifest: resumable, appendable, going on past bad rows.

Each manifest row's image is encoded by the session (image embedding, 512-d) and its report, when
it has one, by the aligned text tower (report embedding). Rows are committed in segments of
``batch`` studies, so an interrupted build loses at most one batch and the next run skips every id
already in the index; a later manifest with new rows appends them without touching the old ones.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .store import VectorIndex


@dataclass
class BuildSummary:
    """What one ``build_index`` run did: counts, and ``failed`` as (row, reason) pairs."""

    index: Path
    added: int = 0
    skipped: int = 0
    total: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"index": str(self.index), "added": self.added, "skipped": self.skipped, "total": self.total,
                "failed": [{"row": w, "error": e} for w, e in self.failed]}


def _record(row, has_report: bool, report: str | None) -> dict[str, Any]:
    return {"id": row.id, "study_id": row.study_id, "body_region": row.body_region, "sequence": row.sequence,
            "image": row.image, "has_report": has_report, "report": report}


def build_index(session, manifest: str | os.PathLike, out: str | os.PathLike, batch: int = 32,
                progress: bool = True) -> BuildSummary:
    """Encode every manifest row not yet in the index at ``out`` and append it.

    >>> s = Session.from_bundle("model.zip", heads=[])
    >>> build_index(s, "demo/data/manifest.jsonl", "demo/index").added
    """
    from tqdm import tqdm

    from decipher_mr.data.io import read_report, read_volume
    from decipher_mr.data.manifest import read_manifest

    if session.model is None:
        raise ValueError(f"{session.bundle.source}: an image-only bundle cannot build a retrieval index "
                         "(it has no shared image-text space)")
    idx = VectorIndex.open_or_create(out, session.fingerprint, session.model.embed_dim, str(session.bundle.source))
    rows, errors = read_manifest(manifest, strict=False)
    summary = BuildSummary(Path(out), total=len(rows) + len(errors))
    summary.failed += [(e.where, str(e)) for e in errors]
    done = idx.ids()
    todo = [r for r in rows if r.id not in done]
    summary.skipped = len(rows) - len(todo)
    pending: list[tuple[dict[str, Any], np.ndarray, str | None]] = []

    def flush() -> None:
        if not pending:
            return
        texts = [t for _, _, t in pending if t]
        rep = session.embed_reports(texts).numpy() if texts else np.zeros((0, idx.dim), np.float32)
        report = np.zeros((len(pending), idx.dim), np.float32)
        report[[n for n, (_, _, t) in enumerate(pending) if t]] = rep
        idx.append([r for r, _, _ in pending], np.stack([v for _, v, _ in pending]), report)
        summary.added += len(pending)
        pending.clear()

    bar = tqdm(todo, desc="index build", unit="study", disable=not progress, file=sys.stderr)
    for row in bar:
        try:
            vol = read_volume(row.image)
            vec = session.image_embedding(vol).numpy()
            text = row.report_text if row.report_text is not None else (read_report(row.report) if row.report else None)
            text = text if text and text.strip() else None
        except Exception as exc:  # one bad study must not stop the build; its reason is reported
            summary.failed.append((row.where, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        finally:
            session.cache.clear()  # a build touches each volume once: keep memory flat
        pending.append((_record(row, text is not None, text), vec, text))
        if len(pending) >= max(1, int(batch)):
            flush()
    flush()
    bar.close()
    return summary
