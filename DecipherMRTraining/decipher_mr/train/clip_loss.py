"""The symmetric CLIP loss over image and report embeddings, gathered across ranks with gradients.

Every rank computes the logits of its own rows against the features of *all* ranks (the "local loss"
of open_clip): memory grows linearly with the number of processes, not quadratically, and because
:func:`decipher_mr.train.distributed.all_gather_with_grad` passes gradients back to the rank that
made each feature, the negatives from other ranks train this rank's towers too. On one process the
gather is the identity and this is the textbook CLIP loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decipher_mr.models.clip import INIT_TEMPERATURE, MAX_LOGIT_SCALE  # noqa: F401 (re-exported)
from decipher_mr.train.distributed import all_gather_with_grad


def clip_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(image→text logits, text→image logits, offset)`` of this rank's rows against all ranks' columns.

    ``offset`` is the position of this rank's first row in the gathered batch (its positives sit on
    the diagonal shifted by it).

    >>> li, lt, off = clip_logits(img_emb, txt_emb, model.logit_scale.exp())
    """
    all_image = all_gather_with_grad(image)
    all_text = all_gather_with_grad(text)
    offset = 0
    if all_image.shape[0] != image.shape[0]:
        offset = torch.distributed.get_rank() * image.shape[0]
    logits_image = logit_scale * image @ all_text.T
    logits_text = logit_scale * text @ all_image.T
    return logits_image, logits_text, offset


class ClipLoss(nn.Module):
    """Mean of image→report and report→image cross-entropy; inputs are L2-normalised embeddings.

    >>> loss = ClipLoss()(img_emb, txt_emb, logit_scale=model.logit_scale.exp())
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if image.shape != text.shape:
            raise ValueError(f"image and text embeddings differ in shape: {tuple(image.shape)} vs {tuple(text.shape)}")
        logits_image, logits_text, offset = clip_logits(image, text, logit_scale)
        labels = torch.arange(image.shape[0], device=image.device) + offset
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


def initial_logit_scale() -> float:
    """log(1/0.07): CLIP's initial temperature, stored as a log so the optimiser works in log space."""
    return math.log(1.0 / INIT_TEMPERATURE)
