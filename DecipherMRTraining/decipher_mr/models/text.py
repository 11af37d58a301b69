"""The text tower: any local Hugging Face BERT-family folder, and report-aware truncation.

A text tower is a BERT-style backbone plus its tokenizer, loaded from a local folder only (nothing is
downloaded; ``HF_HUB_OFFLINE=1`` is set before transformers is imported). The default folder is the
packaged all-MiniLM-L6-v2. For fast tests ``{"tiny": true}`` builds a small randomly initialised BERT
that shares MiniLM's WordPiece tokenizer.

Reports longer than the model's limit (at most 512 tokens) are shortened section by section so that
what matters for alignment survives (``truncate_report_ids``):

1. sections named HISTORY / INDICATION / CLINICAL ... / TECHNIQUE / COMPARISON / PROCEDURE are
   dropped first (in that order), then any other non-findings section;
2. then FINDINGS is trimmed from the middle (its first and last sentences usually carry the
   overall statement and the incidental remarks), marked with a literal ``...``;
3. IMPRESSION (or CONCLUSION) is always kept; only if it alone is over the limit is it cut at its end.

Report text is patient data: nothing here logs or prints it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

MAX_TOKENS = 512
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# A model may pad its embedding table beyond the tokenizer (to a multiple of 8 or 64); a gap larger
# than this means the tokenizer belongs to another model.
MAX_VOCAB_PADDING = 128


class TextTowerError(ValueError):
    """A text encoder folder that cannot be used; the message names the folder and the problem."""


def check_text_folder(path: str | os.PathLike) -> Path:
    """Raise ``TextTowerError`` unless ``path`` holds a config, safetensors weights and a tokenizer.

    >>> check_text_folder(minilm_text_encoder())
    """
    folder = Path(path)
    if not folder.is_dir():
        raise TextTowerError(f"{folder}: text encoder folder does not exist")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        hint = " (pickled pytorch_model.bin is refused; convert it to safetensors)" if (
            folder / "pytorch_model.bin"
        ).exists() else ""
        missing.append("model.safetensors" + hint)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or vocab.txt)")
    if missing:
        raise TextTowerError(f"{folder}: text encoder folder is missing {', '.join(missing)}")
    return folder


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local folder (fast tokenizer when available).

    >>> tok = load_tokenizer(minilm_text_encoder())
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise TextTowerError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc


def check_vocab_match(tokenizer, vocab_size: int, where: str | os.PathLike) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table (a mismatched pair)."""
    n = len(tokenizer)
    if n > vocab_size or vocab_size - n > MAX_VOCAB_PADDING:
        raise TextTowerError(
            f"{where}: tokenizer does not match the model: tokenizer has {n} tokens, "
            f"model vocab_size is {vocab_size}"
        )


def tiny_bert_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2, **extra: Any):
    """A small BERT config for tests and smoke runs."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=MAX_TOKENS,
        **extra,
    )


def load_text_backbone(spec: str | os.PathLike | dict | None = None, masked_lm: bool = False):
    """Load ``(model, tokenizer, folder)`` from a spec.

    ``spec`` is a folder path, ``None`` (packaged MiniLM) or a dict ``{"path": ..., "tiny": bool,
    "hidden": 64, "layers": 2, "heads": 2, "seed": 0}``. With ``masked_lm`` the model carries an MLM
    head (new heads are initialised when the folder has none, as for MiniLM).

    >>> model, tok, folder = load_text_backbone({"tiny": True})
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertForMaskedLM, BertModel

    from decipher_mr.assets import minilm_text_encoder

    if spec is None or isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    spec = dict(spec)
    folder = Path(spec.get("path") or minilm_text_encoder())
    if spec.get("tiny"):
        tokenizer = load_tokenizer(check_tokenizer_folder(folder))
        torch.manual_seed(int(spec.get("seed", 0)))
        config = tiny_bert_config(
            len(tokenizer), hidden=int(spec.get("hidden", 64)), layers=int(spec.get("layers", 2)),
            heads=int(spec.get("heads", 2)),
        )
        model = BertForMaskedLM(config) if masked_lm else BertModel(config, add_pooling_layer=False)
        return model, tokenizer, folder
    check_text_folder(folder)
    tokenizer = load_tokenizer(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise TextTowerError(f"{folder}: config.json cannot be read ({type(exc).__name__}: {exc})") from exc
    check_vocab_match(tokenizer, int(getattr(config, "vocab_size", 0)), folder)
    cls = AutoModelForMaskedLM if masked_lm else AutoModel
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "newly initialised MLM head" is expected
        # Its per-tensor "Loading weights" bar is noise in our logs and in the worker's stderr.
        transformers.logging.disable_progress_bar()
        try:
            model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception as exc:
        raise TextTowerError(f"{folder}: weights cannot be loaded ({type(exc).__name__}: {exc})") from exc
    return model, tokenizer, folder


def check_tokenizer_folder(folder: Path) -> Path:
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TextTowerError(f"{folder}: no tokenizer (tokenizer.json or vocab.txt) in this folder")
    return folder


# ---------------------------------------------------------------------------------------------
# report-aware truncation

_HEADER = re.compile(r"^\s*([A-Z][A-Z /&-]{2,40}):", re.MULTILINE)
_DROP_ORDER = ("HISTORY", "INDICATION", "CLINICAL", "REASON", "TECHNIQUE", "PROTOCOL", "PROCEDURE", "COMPARISON")
_FINDINGS = ("FINDINGS",)
_IMPRESSION = ("IMPRESSION", "CONCLUSION", "SUMMARY", "OPINION")


def split_sections(text: str) -> list[tuple[str, str]]:
    """Split a report into ``(HEADER, body)`` pairs; text before the first header gets header ``""``.

    >>> split_sections("HISTORY: fall. FINDINGS: normal. IMPRESSION: none.")[0][0]
    'HISTORY'
    """
    # headers may also follow a sentence on the same line ("... fall. FINDINGS: ...")
    marked = re.sub(r"(?<=[.\n])\s*(?=[A-Z][A-Z /&-]{2,40}:)", "\n", text)
    parts: list[tuple[str, str]] = []
    matches = list(_HEADER.finditer(marked))
    if not matches or matches[0].start() > 0:
        head = marked[: matches[0].start() if matches else len(marked)]
        if head.strip():
            parts.append(("", head))
    for n, m in enumerate(matches):
        end = matches[n + 1].start() if n + 1 < len(matches) else len(marked)
        parts.append((m.group(1).strip().upper(), marked[m.start() : end]))
    return parts


def _kind(header: str) -> str:
    if any(header.startswith(h) for h in _IMPRESSION):
        return "impression"
    if any(header.startswith(h) for h in _FINDINGS) or header == "":
        return "findings"
    for rank, h in enumerate(_DROP_ORDER):
        if h in header:
            return f"drop{rank}"
    return "other"


def truncate_report_ids(sections: Sequence[tuple[str, list[int]]], budget: int, ellipsis: list[int]) -> list[int]:
    """Token ids of a report cut to ``budget`` tokens with the section priorities of the module doc.

    ``sections`` are ``(header, token ids)`` in report order.

    >>> truncate_report_ids([("FINDINGS", [5] * 600), ("IMPRESSION", [7] * 10)], 510, [999])
    """
    kinds = [_kind(h) for h, _ in sections]
    keep = [list(ids) for _, ids in sections]
    total = sum(len(k) for k in keep)
    if total <= budget:
        return [t for k in keep for t in k]
    drop_sequence = [f"drop{r}" for r in range(len(_DROP_ORDER))] + ["other"]
    for kind in drop_sequence:
        for n, k in enumerate(kinds):
            if k == kind and total > budget:
                total -= len(keep[n])
                keep[n] = []
    if total > budget:
        # trim findings from the middle, last findings section first
        for n in reversed(range(len(keep))):
            if kinds[n] != "findings" or total <= budget or not keep[n]:
                continue
            excess = total - budget
            ids = keep[n]
            room = len(ids) - excess - len(ellipsis)
            if room <= 0:
                total -= len(ids)
                keep[n] = []
                continue
            head = ids[: (room + 1) // 2]
            tail = ids[len(ids) - room // 2 :] if room // 2 else []
            keep[n] = head + ellipsis + tail
            total = sum(len(k) for k in keep)
    flat = [t for k in keep for t in k]
    return flat[:budget]


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def tokenize_reports(tokenizer, reports: Sequence[str], max_length: int = MAX_TOKENS) -> list[list[int]]:
    """Token ids (with [CLS]/[SEP]) for each report, section-aware truncated to ``max_length``.

    >>> ids = tokenize_reports(tok, ["FINDINGS: normal. IMPRESSION: normal study."])
    """
    max_length = min(int(max_length), MAX_TOKENS)
    budget = max_length - 2
    ellipsis = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("..."))
    out: list[list[int]] = []
    # one batched tokenizer call over every section of every report: fast tokenizers parallelise it
    splits = [split_sections(r or "") for r in reports]
    flat = [body for secs in splits for _, body in secs]
    encoded = _quiet_tokenize(tokenizer, flat) if flat else []
    pos = 0
    for secs in splits:
        ids = [(h, encoded[pos + n]) for n, (h, _) in enumerate(secs)]
        pos += len(secs)
        body = truncate_report_ids(ids, budget, ellipsis)
        out.append([tokenizer.cls_token_id] + body + [tokenizer.sep_token_id])
    return out


def _quiet_tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # long reports are expected here (we cut them ourselves), so silence the "longer than 512" warning
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)


def pad_token_ids(ids: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Right-pad a list of id lists to the longest one (dynamic padding, not to 512)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for n, x in enumerate(ids):
        input_ids[n, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[n, : len(x)] = 1
    return TokenBatch(input_ids, mask)


class TextTower(nn.Module):
    """BERT backbone + pooling to one vector per report (mean over tokens, or the [CLS] token).

    >>> tower = TextTower.from_spec(None)                 # packaged MiniLM, 384-d
    >>> vecs = tower.encode(["FINDINGS: ... IMPRESSION: normal."])   # (1, 384)
    """

    def __init__(self, backbone: nn.Module, tokenizer, pooling: str = "mean", max_length: int = MAX_TOKENS,
                 source: str | None = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"text pooling must be 'mean' or 'cls', not {pooling!r}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = min(int(max_length), MAX_TOKENS)
        self.source = source

    @classmethod
    def from_spec(cls, spec: str | os.PathLike | dict | None = None) -> "TextTower":
        spec_d = dict(spec) if isinstance(spec, dict) else {"path": spec}
        backbone, tokenizer, folder = load_text_backbone(spec_d)
        return cls(backbone, tokenizer, pooling=spec_d.get("pooling", "mean"),
                   max_length=spec_d.get("max_length", MAX_TOKENS), source=str(folder))

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def layers(self) -> nn.ModuleList:
        return self.backbone.encoder.layer

    def tokenize(self, reports: Sequence[str]) -> TokenBatch:
        return pad_token_ids(tokenize_reports(self.tokenizer, reports, self.max_length), self.tokenizer.pad_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def encode(self, reports: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Pooled vectors for many reports, batched by similar length so little padding is computed."""
        from tqdm import tqdm

        ids = tokenize_reports(self.tokenizer, reports, self.max_length)
        order = sorted(range(len(ids)), key=lambda n: len(ids[n]))
        out = torch.zeros(len(ids), self.hidden_size)
        was_training = self.training
        self.eval()
        for start in tqdm(range(0, len(order), batch_size), desc="encode reports", disable=not progress,
                          leave=False):
            chunk = order[start : start + batch_size]
            batch = pad_token_ids([ids[n] for n in chunk], self.tokenizer.pad_token_id)
            out[chunk] = self(batch.input_ids, batch.attention_mask).float()
        self.train(was_training)
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the backbone (safetensors) and tokenizer as a loadable Hugging Face folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
