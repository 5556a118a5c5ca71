"""Parity of the Flax U-Net with diffusers' PyTorch `UNet2DConditionModel` on tiny random SD1.5- and
SDXL-like models saved in the real diffusers format; export round trip; the discriminator seam."""

import json
import os

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from d2g_jax.models.unet import load_unet, save_unet
from d2g_jax.models.weights import read_safetensors

# fp32 tolerance: max abs error relative to the output scale (issue 2 asks for ≤ 1e-4).
REL_TOL = 1e-4

SD15_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=8,
)
SDXL_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=40,
    attention_head_dim=(2, 4, 6),
    transformer_layers_per_block=(1, 1, 3),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
    norm_num_groups=8,
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """diffusers initialises norms to (1, 0); perturb every parameter so layout and norm mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _build(tmp_path_factory, name, cfg, seed):
    torch.manual_seed(seed)
    model = TorchUNet(**cfg).eval()
    _randomize(model, seed)
    folder = str(tmp_path_factory.mktemp(name) / "unet")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return _build(tmp_path_factory, "sd15", SD15_LIKE, 0)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _build(tmp_path_factory, "sdxl", SDXL_LIKE, 1)


def _inputs(cfg, batch, hw, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *hw, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, 9, cfg["cross_attention_dim"])).astype(np.float32)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        extra["text_embeds"] = rng.standard_normal((batch, 24)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[64, 48, 0, 3, 64, 48]], np.float32), (batch, 1))
        extra["time_ids"][:, 3] += np.arange(batch)
    return x, ctx, extra


def _torch_forward(model, x, t, ctx, extra):
    added = {k: torch.from_numpy(v) for k, v in extra.items()} or None
    with torch.no_grad():
        out = model(
            torch.from_numpy(x).permute(0, 3, 1, 2), torch.as_tensor(t), torch.from_numpy(ctx), added_cond_kwargs=added
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def _check(model, folder, cfg, hw, timesteps):
    module, variables = load_unet(folder)
    apply = jax.jit(module.apply)
    x, ctx, extra = _inputs(cfg, len(timesteps), hw, seed=len(timesteps))
    t = np.asarray(timesteps, np.float32)
    ref = _torch_forward(model, x, t, ctx, extra)
    out = np.asarray(apply(variables, x, t, ctx, **extra))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"relative max abs error {err:.2e} > {REL_TOL}"
    return module, variables


@pytest.mark.parametrize("hw", [(16, 16), (18, 14)])
def test_sd15_like_matches_diffusers(sd15, hw):
    model, folder = sd15
    _check(model, folder, SD15_LIKE, hw, [0.0, 250.0, 999.0])


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_sdxl_like_matches_diffusers(sdxl, hw):
    model, folder = sdxl
    _check(model, folder, SDXL_LIKE, hw, [1.0, 500.0, 980.0])


def test_scalar_timestep_broadcasts(sd15):
    model, folder = sd15
    module, variables = load_unet(folder)
    x, ctx, extra = _inputs(SD15_LIKE, 2, (16, 16), 3)
    ref = _torch_forward(model, x, np.float32(321.0), ctx, extra)
    out = np.asarray(jax.jit(module.apply)(variables, x, jnp.float32(321.0), ctx))
    assert np.abs(out - ref).max() / np.abs(ref).max() <= REL_TOL


def test_export_round_trip_bit_identical(sdxl, tmp_path):
    model, folder = sdxl
    module, variables = load_unet(folder)
    out_dir = str(tmp_path / "exported")
    save_unet(out_dir, module.config, variables)
    orig = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    back = read_safetensors(os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
    assert sorted(orig) == sorted(back)
    for k in orig:
        assert orig[k].dtype == back[k].dtype and np.array_equal(orig[k], back[k]), k
    reloaded, info = TorchUNet.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileExistsError):
        save_unet(out_dir, module.config, variables)  # never overwrite


def test_fp16_variant_and_sharded_checkpoints(sd15, tmp_path):
    model, folder = sd15
    _, ref = load_unet(folder)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert any(f.endswith(".index.json") for f in os.listdir(sharded))
    _, shard_vars = load_unet(sharded)
    jax.tree.map(np.testing.assert_array_equal, ref, shard_vars)

    half = str(tmp_path / "fp16")
    model.to(torch.float16).save_pretrained(half, variant="fp16")
    model.to(torch.float32)
    assert os.path.isfile(os.path.join(half, "diffusion_pytorch_model.fp16.safetensors"))
    _, half_vars = load_unet(half, param_dtype=jnp.float32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3), ref, half_vars)
    # Loading straight into bf16 storage works too.
    _, bf = load_unet(half, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))


def test_pipeline_folder_is_accepted(sd15):
    _, folder = sd15
    module, _ = load_unet(os.path.dirname(folder))
    assert module.config.block_out_channels == (32, 64, 64)


def test_bf16_compute_close_to_fp32(sdxl):
    _, folder = sdxl
    m32, v32 = load_unet(folder)
    m16, v16 = load_unet(folder, dtype=jnp.bfloat16)
    x, ctx, extra = _inputs(SDXL_LIKE, 2, (16, 16), 7)
    t = np.array([100.0, 700.0], np.float32)
    a = np.asarray(jax.jit(m32.apply)(v32, x, t, ctx, **extra))
    b = np.asarray(jax.jit(m16.apply)(v16, x, t, ctx, **extra))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() / np.abs(a).max() < 5e-2


def test_remat_gives_same_values_and_grads():
    from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables, dummy_inputs
    from d2g_jax.models.unet_config import UNetConfig

    cfg = UNetConfig(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 1),
        transformer_layers_per_block=(1, 1),
        reverse_transformer_layers_per_block=(1, 1),
        num_attention_heads=(2, 2),
        cross_attention_dim=(8, 8),
        norm_num_groups=4,
    )
    m0 = UNet2DConditionModel(cfg)
    m1 = UNet2DConditionModel(cfg, remat_policy="nothing_saveable")
    shapes = dummy_inputs(cfg, batch=2, size=8, seq=3)
    x, t, ctx = (
        np.random.default_rng(i).standard_normal(shapes[k].shape).astype(np.float32)
        for i, k in enumerate(("sample", "timesteps", "encoder_hidden_states"))
    )
    rng = np.random.default_rng(0)  # random values straight into the eval_shape tree (no init compile)
    v = jax.tree.map(
        lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), flax.linen.unbox(abstract_variables(m0))
    )

    def loss(module):
        return lambda p: jnp.mean(module.apply(p, x, t, ctx) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(loss(m0)))(v)
    l1, g1 = jax.jit(jax.value_and_grad(loss(m1)))(v)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_feature_seam_for_the_discriminator(sdxl):
    """The discriminator's inputs/read-outs: zero extra inputs change nothing; features have the right shapes."""
    _, folder = sdxl
    module, v = load_unet(folder)
    x, ctx, extra = _inputs(SDXL_LIKE, 2, (16, 16), 11)
    t = np.array([10.0, 20.0], np.float32)
    apply = jax.jit(module.apply, static_argnames="return_features")
    base = apply(v, x, t, ctx, **extra)
    zeros = tuple(jnp.zeros((2, 16 >> i, 16 >> i, c)) for i, c in enumerate((32, 32, 64)))
    out, feats = apply(v, x, t, ctx, **extra, down_block_additional_inputs=zeros, return_features=True)
    np.testing.assert_array_equal(base, out)
    assert [f.shape for f in feats.down] == [(2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 96)]
    assert feats.mid.shape == (2, 4, 4, 96)
    assert len(feats.up) == 3
    for f, (res, ch) in zip(feats.up, [(4, 96), (8, 64), (16, 32)]):
        assert f.hidden_in.shape[1:3] == (res, res)
        assert f.out.shape == (2, res, res, ch)
        assert len(f.skips) == 3 and all(s.shape[1:3] == (res, res) for s in f.skips)
    bumped = (None, jnp.ones((2, 8, 8, 32)), None)
    assert not np.allclose(base, apply(v, x, t, ctx, **extra, down_block_additional_inputs=bumped))


def test_exported_config_rebuilds_same_architecture(sd15, tmp_path):
    model, folder = sd15
    module, variables = load_unet(folder)
    out = str(tmp_path / "e")
    save_unet(out, module.config, variables)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    rebuilt = TorchUNet.from_config(cfg)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())
