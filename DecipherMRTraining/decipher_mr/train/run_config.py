"""Stage configs: a JSON file of defaults-overriding values, plus ``key=value`` overrides from the CLI.

``key`` may be dotted (``text.tiny=true``); ``value`` is parsed as JSON when it parses
(``true``, ``3``, ``[64,64,32]``, ``null``) and kept as a string otherwise (``output=runs/a``).
Unknown top-level keys are refused, naming the file, so a typo never silently trains with a default.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence


class ConfigError(ValueError):
    pass


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_run_config(path: str | Path | None, defaults: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults ← JSON file ← overrides; refuses unknown top-level keys.

    >>> cfg = load_run_config("configs/text-demo.json", MLM_DEFAULTS, ["iterations=20"])
    """
    where = str(path) if path else "defaults"
    cfg = copy.deepcopy(defaults)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            file_cfg = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: not valid JSON ({exc})") from exc
        file_cfg.pop("_comment", None)
        unknown = sorted(set(file_cfg) - set(defaults))
        if unknown:
            raise ConfigError(f"{p}: unknown keys {unknown}; known: {sorted(defaults)}")
        cfg = merge(cfg, file_cfg)
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] not in defaults:
            raise ConfigError(f"override {text!r}: unknown key {keys[0]!r} ({where}); known: {sorted(defaults)}")
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return cfg
