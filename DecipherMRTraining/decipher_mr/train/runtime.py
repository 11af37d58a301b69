"""GPU speed settings shared by the stage-2 (align) and text MLM trainers (issue 13).

* :func:`configure_math`: TF32 matmuls and cuDNN convolutions on CUDA (no-op elsewhere).
* :func:`adamw_options`: ``fused=True`` AdamW on CUDA (one kernel for all parameters), ``foreach``
  elsewhere. Stage 1 can use the same line:
  ``torch.optim.AdamW(groups, lr=..., betas=..., **adamw_options(ctx.device))``.
* :func:`fetch_metrics`: the one host synchronisation of a training step: every per-step scalar
  (loss, grad norm, temperature, ...) is stacked on the device, optionally averaged over ranks in one
  all-reduce, and copied to the host with a single ``tolist()``. Everything else in the step stays
  asynchronous, so the CPU can queue the next step's kernels while the GPU works.

Precision itself is :func:`decipher_mr.models.vit3d.resolve_precision` /
:func:`~decipher_mr.models.vit3d.precision_context`, as in stage 1 (``"auto"``: bf16 autocast
where bf16 is native, fp32 elsewhere). Losses are always computed in fp32 outside autocast.
"""

from __future__ import annotations

import inspect
from typing import Mapping

import torch

from decipher_mr.train.distributed import all_reduce_mean


def configure_math(device: torch.device | str) -> None:
    """Allow TF32 for fp32 matmuls and cuDNN convolutions on CUDA (Ampere and later run them on
    tensor cores with a 10-bit mantissa; bf16 autocast regions are unaffected)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw_options(device: torch.device | str) -> dict[str, bool]:
    """Keyword arguments for ``torch.optim.AdamW``: the fused CUDA kernel where this torch has it,
    else the multi-tensor (foreach) implementation.

    >>> torch.optim.AdamW(groups, lr=1e-4, **adamw_options(ctx.device))
    """
    params = inspect.signature(torch.optim.AdamW).parameters
    if torch.device(device).type == "cuda" and "fused" in params:
        return {"fused": True}
    return {"foreach": True}


def fetch_metrics(values: Mapping[str, torch.Tensor | float], average: bool = True) -> dict[str, float]:
    """Host floats of a step's metrics with one device-to-host synchronisation (and, with a process
    group and ``average``, one all-reduce averaging them over ranks). Python numbers pass through.

    >>> fetch_metrics({"loss": loss.detach(), "grad_norm": norm})   # {'loss': 2.3, 'grad_norm': 0.8}
    """
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()])
        if average:
            all_reduce_mean(stacked)
        out.update(zip(tensors, stacked.tolist()))
    return {k: out[k] for k in values}
