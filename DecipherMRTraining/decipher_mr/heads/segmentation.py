"""UNETR-style segmentation decoder from several encoder depths to full-resolution masks.

Tokens from three depths (``config.layers``) are folded back to feature volumes at 1/8 resolution.
The deepest goes up by transposed convolutions, the two shallower ones are projected up to 1/4 and
1/2 resolution (MONAI's ``UnetrPrUpBlock``) and joined as skips (``UnetrUpBlock``); the image itself
is joined at full resolution before a last convolution, which is what lets a frozen 8-voxel-patch
encoder draw voxel-accurate boundaries.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from .configs import SegmentConfig
from .dense import token_volume


def default_layers(depth: int) -> list[int]:
    """Three 1-based block numbers spread over an encoder of ``depth`` blocks (e.g. 4, 8, 12)."""
    return [max(1, depth // 3), max(1, (2 * depth) // 3), depth]


class SegmentationHead(nn.Module):
    """Decoder ``(EncoderOutput, image) -> (B, C, X, Y, Z)`` logits; ``C = len(config.labels)``.

    >>> head = SegmentationHead(SegmentConfig(task="segment", embed_dim=64, labels=["bg", "lesion"], layers=[1, 2, 2]))
    >>> out = encoder(x, return_layers=head.required_layers); logits = head(out, image=x)
    """

    def __init__(self, cfg: SegmentConfig, out_channels: int | None = None):
        super().__init__()
        if len(cfg.layers) != 3:
            raise ValueError(f"the segmentation decoder takes three encoder depths, got layers={cfg.layers}")
        if cfg.patch_size != 8:
            raise ValueError("the decoder is built for 8x8x8 patches (three 2x up-sampling steps)")
        self.config = cfg
        d, c = cfg.embed_dim, cfg.channels
        k = out_channels if out_channels is not None else len(cfg.labels)
        if k < 1:
            raise ValueError("a segmentation head needs labels (background first)")
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.skip_half = UnetrPrUpBlock(3, d, c, num_layer=1, kernel_size=3, stride=1, upsample_kernel_size=2,
                                        norm_name="instance", conv_block=True, res_block=True)
        self.skip_quarter = UnetrPrUpBlock(3, d, 2 * c, num_layer=0, kernel_size=3, stride=1, upsample_kernel_size=2,
                                           norm_name="instance", conv_block=True, res_block=True)
        self.bottom = UnetrBasicBlock(3, d, 4 * c, kernel_size=3, stride=1, norm_name="instance", res_block=True)
        self.up_quarter = UnetrUpBlock(3, 4 * c, 2 * c, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
        self.up_half = UnetrUpBlock(3, 2 * c, c, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
        # Full resolution dominates the cost on CPU: one transposed conv and one conv over the
        # up-sampled features joined with the raw image, instead of a full UNETR block pair.
        self.up_full = nn.ConvTranspose3d(c, c, kernel_size=2, stride=2)
        self.refine = Convolution(3, c + 1, c, kernel_size=3, norm="instance", act=("leakyrelu", {"negative_slope": 0.01}))
        self.out = UnetOutBlock(3, c, k)

    @property
    def required_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.config.layers)))

    def forward(self, out, image: torch.Tensor | None = None, text=None) -> torch.Tensor:
        if image is None:
            raise ValueError("the segmentation head needs the image (full-resolution skip)")
        missing = [l for l in self.config.layers if l not in out.layers]
        if missing:
            raise ValueError(f"encoder output lacks layers {missing}; call the encoder with return_layers={self.required_layers}")
        shape = image.shape[2:]
        pad = [g * 8 - s for g, s in zip(out.grid, shape)]
        x = image.float()
        if any(pad):
            x = nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        shallow, middle, deep = (token_volume(n(out.layers[l].float()), out.grid)
                                 for n, l in zip(self.norms, self.config.layers))
        h = self.bottom(deep)
        h = self.up_quarter(h, self.skip_quarter(middle))
        h = self.up_half(h, self.skip_half(shallow))
        h = self.refine(torch.cat([self.up_full(h), x], dim=1))
        return self.out(h)[..., : shape[0], : shape[1], : shape[2]]
