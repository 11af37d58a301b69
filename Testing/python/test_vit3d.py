"""The 3D ViT encoder: token grids, position-grid resizing, padding, masking, layers, save/load.

Inputs are real MRI (Colin27 T1, downsampled) so the numbers flowing through are realistic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decipher_mr.models import (
    VisionEncoderConfig,
    build_vision_encoder,
    load_vision_encoder,
    precision_context,
    save_vision_encoder,
    vision_config,
)


@pytest.fixture(scope="module")
def colin() -> torch.Tensor:
    """Colin27 T1 (real MRI), normalised to [0, 1], as a (1, 1, X, Y, Z) float tensor."""
    import nibabel as nib

    from decipher_mr.assets import colin27_t1

    arr = np.asarray(nib.load(str(colin27_t1())).dataobj, dtype=np.float32)
    t = torch.from_numpy(arr / arr.max())[None, None]
    return t


def crop_of(colin: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """A central crop of Colin27 resampled to ``size`` (in-plane area-downsampled, thick slices)."""
    return F.interpolate(colin, size=size, mode="area")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_vision_encoder("vit-micro").eval()


def test_presets_have_paper_sizes():
    base = build_vision_encoder("vit-base")
    n = sum(p.numel() for p in base.parameters())
    assert base.config.patch_size == (8, 8, 8) and base.config.embed_dim == 768
    assert base.config.depth == 12 and base.config.num_heads == 12 and base.config.mlp_dim == 3072
    assert 85e6 < n < 90e6
    assert vision_config("vit-small").embed_dim == 384


@pytest.mark.parametrize("size,grid", [((256, 256, 24), (32, 32, 3)), ((128, 128, 16), (16, 16, 2))])
def test_token_counts_on_the_paper_crops(colin, micro, size, grid):
    with torch.inference_mode():
        out = micro(crop_of(colin, size))
    assert out.grid == grid
    assert out.patch_tokens.shape == (1, grid[0] * grid[1] * grid[2], 64)
    assert out.cls.shape == (1, 64) and out.padding == (0, 0, 0)


def test_same_grid_position_embedding_is_bit_equal(micro):
    stored = micro.pos_embed
    pe = micro.position_embedding(tuple(stored.shape[2:]))
    assert torch.equal(pe, stored.flatten(2).transpose(1, 2))


def test_anisotropic_grid_is_resized_trilinearly(colin, micro):
    grid = (12, 5, 3)  # differs from the stored (8, 8, 2) on every axis, differently
    pe = micro.position_embedding(grid)
    expected = F.interpolate(micro.pos_embed, size=grid, mode="trilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert pe.shape == (1, 12 * 5 * 3, 64)
    torch.testing.assert_close(pe, expected)
    with torch.inference_mode():
        out = micro(crop_of(colin, (96, 40, 24)))
    assert out.grid == grid and torch.isfinite(out.patch_tokens).all()


def test_non_multiple_input_is_zero_padded_at_the_high_end(colin, micro):
    x = crop_of(colin, (61, 70, 13))
    with torch.inference_mode():
        out = micro(x)
        padded = micro(F.pad(x, (0, 3, 0, 2, 0, 3)))
    assert out.grid == (8, 9, 2) and out.padding == (3, 2, 3)
    torch.testing.assert_close(out.patch_tokens, padded.patch_tokens)


def test_mask_replaces_patch_embeddings_by_the_mask_token(colin, micro):
    x = crop_of(colin, (64, 64, 16))
    n = 8 * 8 * 2
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :40] = True
    with torch.inference_mode():
        masked = micro(x, mask=mask)
        plain = micro(x)
        all_masked = micro(torch.zeros_like(x), mask=torch.ones(1, n, dtype=torch.bool))
        all_masked_other = micro(x, mask=torch.ones(1, n, dtype=torch.bool))
    assert not torch.allclose(masked.cls, plain.cls)
    # Fully masked: the image content no longer matters.
    torch.testing.assert_close(all_masked.patch_tokens, all_masked_other.patch_tokens)
    with pytest.raises(ValueError, match="mask must have shape"):
        micro(x, mask=torch.zeros(1, n + 1, dtype=torch.bool))


def test_intermediate_layers_and_registers(colin):
    torch.manual_seed(0)
    enc = build_vision_encoder("vit-micro", num_registers=2, depth=4).eval()
    with torch.inference_mode():
        out = enc(crop_of(colin, (64, 64, 16)), return_layers=(1, 2, 4))
    assert sorted(out.layers) == [1, 2, 4]
    assert all(t.shape == (1, 128, 64) for t in out.layers.values())
    assert out.registers.shape == (1, 2, 64)
    assert out.patch_volume().shape == (1, 64, 8, 8, 2)
    with pytest.raises(ValueError, match="return_layers"):
        enc(crop_of(colin, (64, 64, 16)), return_layers=(5,))


def test_patch_embedding_matches_a_strided_conv3d(colin, micro):
    x = crop_of(colin, (64, 64, 16))
    tokens, _, _ = micro.embed_patches(x)
    conv = F.conv3d(x, micro.patch_embed.weight, micro.patch_embed.bias, stride=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, conv, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(colin, micro):
    x = crop_of(colin, (64, 64, 16))
    with torch.inference_mode():
        ref = micro(x).patch_tokens
        with precision_context("cpu", "bf16"):
            low = micro(x).patch_tokens
    cos = F.cosine_similarity(ref.flatten().float(), low.flatten().float(), dim=0)
    assert cos > 0.99


def test_training_features_drop_path_and_checkpointing_give_gradients(colin):
    torch.manual_seed(0)
    enc = build_vision_encoder("vit-micro", drop_path_rate=0.2, activation_checkpointing=True, layerscale_init=1e-5).train()
    out = enc(crop_of(colin, (32, 32, 8)).repeat(2, 1, 1, 1, 1))
    (out.cls.sum() + out.patch_tokens.mean()).backward()
    assert enc.blocks[0].ls1.gamma.grad is not None and enc.pos_embed.grad is not None


def test_config_round_trips_through_json():
    cfg = vision_config("vit-tiny", num_registers=4)
    again = VisionEncoderConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        vision_config("vit-huge")
    with pytest.raises(ValueError, match="unknown vision encoder config keys"):
        VisionEncoderConfig.from_dict({"embed_dims": 3})


def test_saved_encoder_loads_back_identically(tmp_path, colin, micro):
    path = save_vision_encoder(micro, tmp_path / "encoder.safetensors")
    assert (tmp_path / "encoder.json").exists()
    again = load_vision_encoder(path).eval()
    x = crop_of(colin, (64, 64, 16))
    with torch.inference_mode():
        assert torch.equal(micro(x).cls, again(x).cls)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_vision_encoder(tmp_path / "broken.safetensors")
