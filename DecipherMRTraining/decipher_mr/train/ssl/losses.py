"""DINO (class token), iBOT (masked patch tokens) and KoLeo losses; each owns its state.

Teacher targets are centred (EMA of the teacher's batch mean, averaged over ranks) or, as an option,
balanced with Sinkhorn-Knopp; both are sharpened by the scheduled teacher temperature. The centre
buffers are part of the module state and therefore of the checkpoint, so a resumed run continues
with the same centre.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from decipher_mr.train.distributed import all_reduce_sum


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments (rows sum to 1) of the teacher's logits, over all ranks' samples.

    The logits are shifted by their maximum over all ranks before ``exp`` (a constant shift cancels
    in the first normalisation), so the result is the same for any number of processes that
    together hold the same rows. A rank may hold no rows (no masked patch): it gets a (0, K) result
    and still takes part in every collective, so the other ranks do not wait for it forever.

    >>> targets = sinkhorn_knopp(teacher_logits, temperature=0.07)
    """
    logits = logits.float()
    device = logits.device
    # The same collectives, in the same order, on every rank whatever its number of rows.
    peak = logits.max().reshape(1) if logits.numel() else torch.full((1,), float("-inf"), device=device)
    _all_reduce(peak, dist.ReduceOp.MAX)
    b = torch.tensor([float(logits.shape[0])], device=device)
    _all_reduce(b)
    if float(b) == 0:  # no row on any rank (every rank sees the same count, so all stop here)
        return logits.new_zeros(logits.shape)
    q = torch.exp((logits - peak) / temperature).t()  # (K, B_local)
    k = q.shape[0]
    total = q.sum()
    _all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        _all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


class _CenteredTargets(nn.Module):
    """Teacher target maker shared by DINO and iBOT (each has its own centre)."""

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "centering"):
        super().__init__()
        if centering not in ("centering", "sinkhorn"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn', got {centering!r}")
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Probabilities (B, K) the student is trained to predict."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher logit over the global batch (summed over ranks, not averaged per rank,
        so that one or many processes with the same global batch give the same centre)."""
        s = teacher_logits.float().sum(dim=0, keepdim=True)
        n = torch.tensor(float(teacher_logits.shape[0]), device=s.device)
        all_reduce_sum(s)
        all_reduce_sum(n)
        # On the device, without asking the host: with no masked patch anywhere in the global batch
        # (n == 0) the centre stays as it was.
        updated = self.center * self.center_momentum + (s / n.clamp_min(1)) * (1 - self.center_momentum)
        self.center.copy_(torch.where(n > 0, updated, self.center))


class DINOLoss(_CenteredTargets):
    """Cross-entropy between the teacher's global-crop targets and the student's every other crop.

    >>> loss_fn = DINOLoss(out_dim=1024)
    >>> t = loss_fn.targets(teacher_logits, teacher_temp=0.07).chunk(2)   # 2 global crops
    >>> loss = loss_fn(student_logits.chunk(2 + n_local), t)
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "centering"):
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp

    def forward(self, student_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], teacher_probs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        terms = 0
        logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        for ti, t in enumerate(teacher_probs):
            for si, lp in enumerate(logp):
                if si == ti:  # the same view: nothing to learn
                    continue
                total = total - (t * lp).sum(-1).mean()
                terms += 1
        return total / max(terms, 1)


class IBOTPatchLoss(_CenteredTargets):
    """Cross-entropy on masked patch tokens; each sample weighs 1 whatever its number of masked patches.

    ``sample_weight`` holds, for every masked token, ``1 / (number of masked tokens of its sample)``;
    the sum is divided by the number of global-crop samples on this rank, so averaging over ranks
    equals the mean over the global batch.

    ``chunk_rows``: the cross-entropy runs over that many masked tokens at a time, each chunk under
    activation checkpointing, so backward keeps no (tokens x prototypes) fp32 log-softmax: with ViT-B's
    ~29k masked tokens per GPU and 65,536 prototypes that is 7.6 GB per copy. The result is the same sum,
    to float rounding. ``None`` or 0: one pass.

    >>> loss = IBOTPatchLoss(1024, chunk_rows=4096)(student_masked_logits, teacher_targets, weights, n_samples=8)
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "centering",
                 chunk_rows: int | None = None):
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp
        self.chunk_rows = int(chunk_rows or 0)

    def _weighted_ce(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -((teacher_probs * logp).sum(-1) * sample_weight).sum()

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, sample_weight: torch.Tensor, n_samples: int) -> torch.Tensor:
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0  # keeps the graph (and DDP) connected
        rows = student_logits.shape[0]
        if not self.chunk_rows or rows <= self.chunk_rows or not torch.is_grad_enabled():
            return self._weighted_ce(student_logits, teacher_probs, sample_weight) / max(n_samples, 1)
        from torch.utils.checkpoint import checkpoint

        total = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, self.chunk_rows):
            part = slice(start, start + self.chunk_rows)
            total = total + checkpoint(self._weighted_ce, student_logits[part], teacher_probs[part], sample_weight[part],
                                       use_reentrant=False)
        return total / max(n_samples, 1)


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser: spread the (L2-normalised) class embeddings.

    Always computed in fp32 (in bf16/fp16 the log of tiny nearest-neighbour distances overflows).

    >>> reg = KoLeoLoss()(student_cls_global_crop_0)
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, eps=self.eps)
            if x.shape[0] < 2:
                return x.sum() * 0.0
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # never pick oneself as nearest neighbour
            nn_idx = dots.argmax(dim=1)
            dist_nn = (x - x[nn_idx]).norm(dim=-1)
            return -torch.log(dist_nn + self.eps).mean()
