"""Checkpoints you can trust: safetensors + JSON, atomic, checksummed, tied to an architecture.

A checkpoint is a folder ``<root>/ckpt-<iteration:08d>/``::

    weights.safetensors     every module's state_dict, keys prefixed "<module name>."
    optimizer.safetensors   every tensor of every optimizer's state, keys "<opt>.<param idx>.<key>"
    rng.safetensors         torch (and CUDA) generator states
    trainer_state.json      iteration, optimizer param groups + scalar state, python/numpy RNG,
                            sampler position, schedule positions, whatever the stage adds
    manifest.json           format version, architecture record, sha256 of each file above (last)

Nothing is pickled. The folder is written under a temporary name and renamed into place, so a
reader sees a whole checkpoint or none; ``latest.json`` (atomic) names the newest one. Loading
verifies the checksums and compares the architecture record and refuses, naming the file, a
corrupt checkpoint or one made for another architecture.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from decipher_mr.storage import atomic_write_json, sha256_file

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; clone to own memory.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python/NumPy RNG as JSON and torch RNG as tensors (for :func:`restore_rng_state`)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    js = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return js, tensors


def restore_rng_state(js: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    v, s, g = js["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, gauss = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _split_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{name}.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _join_optimizer(name: str, js: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = name + "."
    for key, val in tensors.items():
        if key.startswith(prefix):
            idx, sub = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[sub] = val
    for idx, sc in js["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": js["param_groups"]}


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    trainer_state: dict[str, Any] | None = None,
    architecture: dict[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    keep: int = 3,
) -> Path:
    """Write ``<root>/ckpt-<iteration>`` atomically, point ``latest.json`` at it, keep the last ``keep``.

    ``trainer_state`` must be JSON-serialisable (iteration counters, sampler position, ...).
    ``architecture`` is the record a resume must match (e.g. the encoder config and head sizes).

    >>> save_checkpoint("runs/a/checkpoints", 100, {"student": student, "teacher": teacher},
    ...                 {"adamw": opt}, {"sampler": sampler.state_dict()}, {"encoder": cfg.to_dict()})
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{iteration:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        weights: dict[str, torch.Tensor] = {}
        for mname, module in modules.items():
            for k, v in module.state_dict().items():
                weights[f"{mname}.{k}"] = v
        if extra_tensors:
            weights.update({f"extra.{k}": v for k, v in extra_tensors.items()})
        save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
        opt_json: dict[str, Any] = {}
        opt_tensors: dict[str, torch.Tensor] = {}
        for oname, opt in (optimizers or {}).items():
            opt_json[oname], t = _split_optimizer(oname, opt)
            opt_tensors.update(t)
        save_file(_contiguous(opt_tensors), str(tmp / "optimizer.safetensors"))
        rng_json, rng_tensors = capture_rng_state()
        save_file(_contiguous(rng_tensors), str(tmp / "rng.safetensors"))
        state = {"iteration": iteration, "optimizers": opt_json, "rng": rng_json, "stage": trainer_state or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        files = ["weights.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "iteration": iteration,
            "architecture": architecture or {},
            "modules": sorted(modules),
            "sha256": {f: sha256_file(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for f in [*files, MANIFEST]:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / "latest.json", {"checkpoint": final.name, "iteration": iteration})
    older = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and p != final)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (or ``None``).

    >>> latest_checkpoint("runs/a/checkpoints")
    PosixPath('runs/a/checkpoints/ckpt-00000100')
    """
    root = Path(root)
    pointer = root / "latest.json"
    if pointer.exists():
        try:
            cand = root / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
            if (cand / MANIFEST).exists():
                return cand
        except (json.JSONDecodeError, KeyError):
            pass
    done = sorted(p for p in root.glob("ckpt-*") if (p / MANIFEST).exists())
    return done[-1] if done else None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint folder ``path``, verified against the files' checksums."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}); it may be incomplete")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mpath}: damaged manifest ({exc})") from exc
    if manifest.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{mpath}: checkpoint format {manifest['format']} is newer than this version reads")
    for name, digest in manifest.get("sha256", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch, the checkpoint is corrupt; delete it or resume from an older one")
    return manifest


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r} vs this run {b!r}"]


def load_checkpoint(
    path: str | os.PathLike,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    architecture: dict[str, Any] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify and load checkpoint folder ``path`` into ``modules``/``optimizers``; return the state.

    The return value is the ``trainer_state`` given to :func:`save_checkpoint` plus ``iteration``
    and ``extra_tensors``. Raises :class:`CheckpointError` naming the file when the checkpoint is
    corrupt or its architecture record differs from ``architecture``.

    >>> state = load_checkpoint(latest_checkpoint("runs/a/checkpoints"), {"student": student},
    ...                         {"adamw": opt}, architecture={"encoder": cfg.to_dict()})
    """
    path = Path(path)
    manifest = read_manifest(path)
    if architecture is not None:
        diffs = _diff(manifest.get("architecture", {}), json.loads(json.dumps(architecture)))
        if diffs:
            raise CheckpointError(
                f"{path}: made for another architecture, refusing to load it ({'; '.join(diffs[:5])})"
            )
    try:
        weights = load_file(str(path / "weights.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc})") from exc
    for mname, module in modules.items():
        prefix = mname + "."
        sd = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{path / 'weights.safetensors'}: has no weights for '{mname}'")
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path / 'weights.safetensors'}: '{mname}' does not fit this model: {exc}") from exc
    for oname, opt in (optimizers or {}).items():
        if oname not in state["optimizers"]:
            raise CheckpointError(f"{path / 'trainer_state.json'}: no state for optimizer '{oname}'")
        try:
            opt.load_state_dict(_join_optimizer(oname, state["optimizers"][oname], opt_tensors))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: optimizer '{oname}' state does not fit: {exc}") from exc
    if restore_rng:
        restore_rng_state(state["rng"], rng_tensors)
    out = dict(state["stage"])
    out["iteration"] = state["iteration"]
    out["extra_tensors"] = {k[len("extra.") :]: v for k, v in weights.items() if k.startswith("extra.")}
    return out
