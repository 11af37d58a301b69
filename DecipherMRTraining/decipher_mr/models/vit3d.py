"""The 3D Vision Transformer encoder (8x8x8 patches) shared by pretraining, heads and inference.

Input is ``(B, C, X, Y, Z)`` in the ``[i, j, k]`` order of :mod:`decipher_mr.data.volume` (canonical
RAS prepared arrays). Tokens are ordered with ``i`` slowest and ``k`` fastest, i.e. the patch grid
``(gx, gy, gz)`` flattened in C order; ``EncoderOutput.grid`` says how to fold them back.

* **Position grid.** The position embedding is a learnt ``(D, gx, gy, gz)`` grid whose shape lives in
  the config (``pos_grid``). For another input grid it is resized trilinearly
  (``align_corners=False``), each axis independently, so anisotropic grids (thick-slice MRI) work;
  when the grids are equal the stored embedding is used as is (bit-equal, no interpolation).
* **Padding.** An input whose size is not a multiple of the patch size is zero-padded at the high end
  of each axis (never cropped); ``EncoderOutput.padding`` reports how many voxels were added.
* **Speed.** Patches are embedded by one matmul on unfolded patches (same weights as a strided
  Conv3d), attention is one fused qkv Linear and ``scaled_dot_product_attention``; all work runs under
  ``torch.autocast`` in bf16 on CPU and GPU (see :func:`precision_context`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class VisionEncoderConfig:
    """Everything needed to rebuild the encoder; JSON round-trips (the model bundle stores it).

    >>> cfg = VisionEncoderConfig.from_dict(json.loads(VisionEncoderConfig(embed_dim=64).to_json()))
    """

    name: str = "custom"
    patch_size: tuple[int, int, int] = (8, 8, 8)
    in_channels: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pos_grid: tuple[int, int, int] = (32, 32, 3)  # the 256x256x24 global crop
    num_registers: int = 0
    qkv_bias: bool = True
    layerscale_init: float | None = 1e-5  # None disables LayerScale
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        self.pos_grid = tuple(int(g) for g in self.pos_grid)  # type: ignore[assignment]
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if len(self.patch_size) != 3 or len(self.pos_grid) != 3:
            raise ValueError("patch_size and pos_grid need three values (i, j, k)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"], d["pos_grid"] = list(self.patch_size), list(self.pos_grid)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionEncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown vision encoder config keys: {sorted(unknown)}")
        return cls(**d)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights' shapes (what a checkpoint must match)."""
        d = self.to_dict()
        for k in ("name", "drop_path_rate", "activation_checkpointing", "layerscale_init"):
            d.pop(k)
        d["layerscale"] = self.layerscale_init is not None
        return d


PRESETS: dict[str, dict[str, Any]] = {
    # As in the paper: ViT-B, 8^3 patches, ~86 M parameters.
    "vit-base": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit-small": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    # CPU demos and tests.
    "vit-tiny": dict(embed_dim=192, depth=6, num_heads=3, mlp_dim=768, pos_grid=(8, 8, 2)),
    "vit-micro": dict(embed_dim=64, depth=2, num_heads=2, mlp_dim=256, pos_grid=(8, 8, 2), layerscale_init=None),
}


def vision_config(name_or_config: str | dict | VisionEncoderConfig | Path, **overrides: Any) -> VisionEncoderConfig:
    """Resolve a preset name, a dict, a JSON file or a config to a :class:`VisionEncoderConfig`.

    >>> vision_config("vit-tiny", drop_path_rate=0.1).embed_dim
    192
    """
    if isinstance(name_or_config, VisionEncoderConfig):
        base = name_or_config.to_dict()
    elif isinstance(name_or_config, dict):
        base = dict(name_or_config)
        if "preset" in base:
            preset = base.pop("preset")
            base = {"name": preset, **_preset(preset), **base}
    elif isinstance(name_or_config, (str, Path)) and str(name_or_config) in PRESETS:
        base = {"name": str(name_or_config), **_preset(str(name_or_config))}
    elif isinstance(name_or_config, (str, Path)) and Path(name_or_config).suffix == ".json":
        path = Path(name_or_config)
        if not path.exists():
            raise FileNotFoundError(f"{path}: vision encoder config not found")
        base = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"unknown vision encoder {name_or_config!r}; presets: {', '.join(PRESETS)}")
    base.update(overrides)
    return VisionEncoderConfig.from_dict(base)


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown vision encoder preset {name!r}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


@dataclass
class EncoderOutput:
    """What the encoder returns.

    ``cls`` (B, D) and ``patch_tokens`` (B, N, D) are after the final LayerNorm; ``layers`` maps a
    1-based block number to that block's raw patch tokens (B, N, D) for UNETR-style decoders;
    ``padding`` is the number of zero voxels added at the high end of each axis.
    """

    cls: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int, int]
    padding: tuple[int, int, int] = (0, 0, 0)
    registers: torch.Tensor | None = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)

    def patch_volume(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens folded back to a (B, D, gx, gy, gz) feature volume.

        >>> out.patch_volume().shape          # torch.Size([1, 768, 32, 32, 3])
        """
        t = self.patch_tokens if tokens is None else tokens
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        # (B, N, 3, h, d) -> (3, B, h, N, d): views only; SDPA takes the strided q, k, v directly.
        q, k, v = self.qkv(x).view(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig, drop_path_rate: float):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.mlp_dim)
        ls = cfg.layerscale_init
        self.ls1 = LayerScale(d, ls) if ls is not None else nn.Identity()
        self.ls2 = LayerScale(d, ls) if ls is not None else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


class VisionTransformer3D(nn.Module):
    """3D ViT with class token, optional register tokens, iBOT mask token and a resizable position grid.

    >>> enc = build_vision_encoder("vit-tiny")
    >>> out = enc(torch.randn(1, 1, 64, 64, 16), return_layers=(2, 4))
    >>> out.grid, out.patch_tokens.shape
    ((8, 8, 2), torch.Size([1, 128, 192]))
    """

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, d, *cfg.pos_grid))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d)) if cfg.num_registers else None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self._init_weights()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))

    def grid_for(self, shape: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Patch grid and high-end padding for a spatial input shape (X, Y, Z).

        >>> enc.grid_for((256, 256, 24))
        ((32, 32, 3), (0, 0, 0))
        """
        grid = tuple(-(-int(s) // p) for s, p in zip(shape, self.config.patch_size))
        pad = tuple(g * p - int(s) for g, p, s in zip(grid, self.config.patch_size, shape))
        return grid, pad  # type: ignore[return-value]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The (1, N, D) position embedding for ``grid``: stored grid as is, or resized trilinearly."""
        pe = self.pos_embed
        if tuple(grid) != tuple(pe.shape[2:]):
            pe = F.interpolate(pe.float(), size=tuple(grid), mode="trilinear", align_corners=False).to(pe.dtype)
        return pe.flatten(2).transpose(1, 2)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
        """(B, C, X, Y, Z) -> (B, N, D) patch embeddings, the grid and the padding."""
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} input channel(s), got {x.shape[1]}")
        grid, pad = self.grid_for(x.shape[2:])
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        B, C = x.shape[:2]
        (gx, gy, gz), (px, py, pz) = grid, self.config.patch_size
        # Unfold non-overlapping patches and embed them with one GEMM: the same arithmetic as the
        # strided Conv3d but a large 2D matmul that runs near peak on CPU in bf16.
        patches = (
            x.reshape(B, C, gx, px, gy, py, gz, pz)
            .permute(0, 2, 4, 6, 1, 3, 5, 7)
            .reshape(B * gx * gy * gz, C * px * py * pz)
        )
        w = self.patch_embed.weight
        tokens = F.linear(patches, w.reshape(w.shape[0], -1), self.patch_embed.bias)
        return tokens.view(B, gx * gy * gz, -1), grid, pad

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_layers: Iterable[int] = (),
    ) -> EncoderOutput:
        """Encode a batch; ``mask`` (B, N) bool replaces those patch embeddings by the mask token.

        >>> out = enc(x, mask=torch.zeros(1, 128, dtype=torch.bool), return_layers=(3, 6))
        """
        tokens, grid, pad = self.embed_patches(x)
        B, N, D = tokens.shape
        if mask is not None:
            if mask.shape != (B, N):
                raise ValueError(f"mask must have shape {(B, N)} (batch, patches), got {tuple(mask.shape)}")
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.position_embedding(grid).to(tokens.dtype)
        parts = [(self.cls_token + self.cls_pos).expand(B, -1, -1).to(tokens.dtype)]
        if self.register_tokens is not None:
            parts.append(self.register_tokens.expand(B, -1, -1).to(tokens.dtype))
        h = torch.cat([*parts, tokens], dim=1)
        skip = 1 + self.config.num_registers
        wanted = set(return_layers)
        bad = [i for i in wanted if not 1 <= i <= len(self.blocks)]
        if bad:
            raise ValueError(f"return_layers {bad} outside 1..{len(self.blocks)}")
        layers: dict[int, torch.Tensor] = {}
        use_ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks, start=1):
            h = checkpoint(blk, h, use_reentrant=False) if use_ckpt else blk(h)
            if i in wanted:
                layers[i] = h[:, skip:]
        h = self.norm(h)
        return EncoderOutput(
            cls=h[:, 0],
            patch_tokens=h[:, skip:],
            grid=grid,
            padding=pad,
            registers=h[:, 1:skip] if skip > 1 else None,
            layers=layers,
        )

    def flops(self, shape: Sequence[int], batch: int = 1) -> float:
        """Analytic multiply-add FLOPs (x2) of one forward pass for a spatial input shape.

        >>> build_vision_encoder("vit-base").flops((256, 256, 24)) / 1e9   # ~ 870 GFLOP
        """
        cfg = self.config
        grid, _ = self.grid_for(shape)
        n_patch = math.prod(grid)
        n = n_patch + 1 + cfg.num_registers
        d, m = cfg.embed_dim, cfg.mlp_dim
        embed = 2 * n_patch * math.prod(cfg.patch_size) * cfg.in_channels * d
        per_block = 2 * n * (3 * d * d + d * d + 2 * d * m) + 4 * n * n * d
        return float(batch * (embed + cfg.depth * per_block))


def build_vision_encoder(name_or_config: str | dict | VisionEncoderConfig | Path = "vit-base", **overrides: Any) -> VisionTransformer3D:
    """The encoder for a preset name (``vit-base``, ``vit-small``, ``vit-tiny``, ``vit-micro``),
    a config dict/JSON file or a :class:`VisionEncoderConfig`.

    >>> enc = build_vision_encoder("vit-base")
    >>> sum(p.numel() for p in enc.parameters()) / 1e6        # ~ 86 M
    """
    return VisionTransformer3D(vision_config(name_or_config, **overrides))


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively on ``device`` (CUDA with bf16, or a CPU with AVX512-BF16/AMX).

    On a CPU without them (AVX2 only) oneDNN emulates bf16 and a GEMM is ~30x slower than fp32.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """``"auto"`` becomes ``"bf16"`` where bf16 is native on ``device`` and ``"fp32"`` elsewhere.

    >>> resolve_precision("cpu", "auto")      # 'fp32' on an AVX2-only CPU
    """
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision in ("bf16", "bfloat16"):
        return "bf16"
    if precision in ("fp32", "float32"):
        return "fp32"
    raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")


def precision_context(device: torch.device | str, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bf16 for ``"bf16"`` (CPU or CUDA), nothing for ``"fp32"``; ``"auto"``
    picks bf16 only where it is native (see :func:`resolve_precision`).

    >>> with precision_context("cpu", "bf16"):
    ...     out = enc(x)
    """
    if resolve_precision(device, precision or "fp32") == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
