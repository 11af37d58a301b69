"""The iBOT cross-entropy in chunks: the same loss and gradients as one pass, and backward keeps no
(tokens x prototypes) fp32 log-softmax (what would not fit on a GPU at ViT-B scale)."""

from __future__ import annotations

import torch

from decipher_mr.train.ssl.losses import IBOTPatchLoss


def _inputs(rows: int = 300, prototypes: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, prototypes, generator=g, requires_grad=True)
    targets = torch.softmax(torch.randn(rows, prototypes, generator=g) / 0.04, dim=-1)
    weights = 1.0 / torch.randint(1, 20, (rows,), generator=g).float()
    return logits, targets, weights


def _saved_bytes(fn, *inputs) -> int:
    """Bytes that autograd keeps alive for backward beyond the inputs themselves (new tensors, not views
    of tensors that exist anyway)."""
    existing = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def test_chunked_ibot_loss_equals_one_pass_with_the_same_gradients():
    logits, targets, weights = _inputs()
    one = IBOTPatchLoss(512)(logits, targets, weights, n_samples=8)
    (g_one,) = torch.autograd.grad(one, logits)
    chunked = IBOTPatchLoss(512, chunk_rows=64)(logits, targets, weights, n_samples=8)  # 5 chunks, the last short
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_one, rtol=1e-6, atol=1e-7)


def test_chunked_ibot_loss_keeps_no_full_log_softmax_for_backward():
    logits, targets, weights = _inputs(rows=1024, prototypes=2048)
    full = 1024 * 2048 * 4  # one fp32 (tokens x prototypes) tensor
    one_bytes, _ = _saved_bytes(lambda: IBOTPatchLoss(2048)(logits, targets, weights, n_samples=8), logits, targets, weights)
    chunk_bytes, _ = _saved_bytes(lambda: IBOTPatchLoss(2048, chunk_rows=128)(logits, targets, weights, n_samples=8),
                                  logits, targets, weights)
    assert one_bytes >= full  # the one-pass loss keeps a full-size log-softmax for backward
    assert chunk_bytes <= full / 8, (chunk_bytes, one_bytes)  # at most about one chunk's worth
