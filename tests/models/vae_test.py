"""Parity of the Flax VAE with diffusers' PyTorch `AutoencoderKL` (tiny, random, saved in the real diffusers
format): encode (posterior mean/logvar), decode, the latent scaling conventions, partial loads and errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from d2g_jax.models.vae import (
    UnsupportedConfigError,
    VAEConfig,
    load_vae,
    scale_latents,
    unscale_latents,
)
from d2g_jax.models.weights import WeightsError, read_safetensors, write_safetensors

# fp32: max abs error relative to the output's max magnitude (measured ≈ 2e-6).
REL_TOL = 1e-5
BF16_REL_TOL = 5e-2  # bf16 compute smoke bound

SDXL_LIKE = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4, sample_size=32,
    layers_per_block=1, scaling_factor=0.13025,
)  # fmt: skip
# SD3/Flux-style: shift_factor, no quant convs; three levels (f = 4), 16 groups.
SHIFTED = dict(
    block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16, latent_channels=4, sample_size=32,
    layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """diffusers initialises GroupNorms to (1, 0); perturb every parameter so layout and norm mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _build(tmp_path_factory, name, cfg, seed):
    torch.manual_seed(seed)
    model = TorchVAE(**cfg).eval()
    _randomize(model, seed)
    folder = str(tmp_path_factory.mktemp(name) / "vae")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _build(tmp_path_factory, "sdxl_vae", SDXL_LIKE, 0)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    return _build(tmp_path_factory, "shifted_vae", SHIFTED, 1)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _assert_close(ours, ref, tol=REL_TOL, what=""):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol} × scale {scale:.3g}"


def _image(f, seed=0):
    # Non-square so an H/W transpose cannot pass.
    return np.random.default_rng(seed).uniform(-1, 1, (2, 8 * f, 6 * f, 3)).astype(np.float32)


def _jit(module, method):
    return jax.jit(lambda p, *a: module.apply(p, *a, method=method))


@pytest.mark.parametrize("fixture", ["sdxl", "shifted"])
def test_encode_decode_parity(request, fixture):
    """Posterior mean/logvar, `decode_latents` = diffusers `decode(z / scaling_factor + shift_factor)`,
    the autoencoder `__call__`, and `encode_latents` (posterior sample, scaled)."""
    model, folder = request.getfixturevalue(fixture)
    module, params = load_vae(folder)
    sf, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
    x = _image(module.config.downscale)
    z = np.random.default_rng(1).standard_normal((2, 8, 6, 4)).astype(np.float32)
    rng = jax.random.key(3)
    full_api = fixture == "sdxl"  # the other model checks encode/decode only (XLA CPU compiles are the cost)
    f = lambda m, x, z, rng: (m.encode(x), m.decode_latents(z)) + ((m(x), m.encode_latents(x, rng)) if full_api else ())
    dist, img, *rest = _jit(module, f)(params, x, z, rng)  # one compile
    with torch.no_grad():
        ref = model.encode(_nchw(x)).latent_dist
        ref_img = _nhwc(model.decode(_nchw(z) / sf + shift).sample)  # what the SD/SDXL/SD3 pipelines decode
    _assert_close(dist.mean, _nhwc(ref.mean), what="posterior mean")
    _assert_close(dist.logvar, _nhwc(ref.logvar), what="posterior logvar")
    assert img.shape == x.shape and img.dtype == jnp.float32
    _assert_close(img, ref_img, what="decode_latents")
    # The diffusion latents of an image: (z_vae - shift) · scaling_factor, as the img2img pipelines compute.
    _assert_close(scale_latents(module.config, dist.mean), (_nhwc(ref.mean) - shift) * sf, what="scale_latents")
    if full_api:
        out, z_sample = rest
        with torch.no_grad():
            ref_out = _nhwc(model(_nchw(x), sample_posterior=False).sample)
        _assert_close(out, ref_out, what="autoencode (__call__)")
        sample = dist.mean + jnp.exp(0.5 * dist.logvar) * jax.random.normal(rng, dist.mean.shape)
        np.testing.assert_allclose(dist.sample(rng), sample, rtol=1e-6)
        np.testing.assert_allclose(z_sample, (sample - shift) * sf, rtol=1e-5, atol=1e-5)


def test_latents_mean_std_convention():
    """Per-channel latents_mean/std (SDXL-EDM-style configs): the pipelines' formulas, both directions."""
    cfg = VAEConfig.from_diffusers(
        {"latent_channels": 4, "scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0],
         "latents_std": [1.0, 2.0, 0.5, 4.0]}
    )  # fmt: skip
    z_vae = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
    mean, std = np.array(cfg.latents_mean, np.float32), np.array(cfg.latents_std, np.float32)
    z = scale_latents(cfg, z_vae)
    np.testing.assert_allclose(z, (z_vae - mean) * 0.5 / std, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(cfg, z), z_vae, rtol=1e-5, atol=1e-6)


def _assert_same_tree(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(k))


def test_decoder_only_and_encoder_only_loads(sdxl):
    """Partial loads hold exactly the full model's subtrees (same code path, so the same outputs)."""
    _, folder = sdxl
    _, fp = load_vae(folder)
    dec, dp = load_vae(folder, parts=("decoder",))
    _, ep = load_vae(folder, parts=("encoder",))
    assert set(dp["params"]) == {"decoder", "post_quant_conv"}
    assert set(ep["params"]) == {"encoder", "quant_conv"}
    _assert_same_tree(dp["params"], {k: fp["params"][k] for k in dp["params"]})
    _assert_same_tree(ep["params"], {k: fp["params"][k] for k in ep["params"]})
    with pytest.raises(ValueError, match="'encoder' is not loaded"):
        dec.apply(dp, _image(2), method="encode")


def test_deprecated_attention_names_and_pipeline_folder(sdxl, tmp_path):
    """Older checkpoints name the mid-block attention query/key/value/proj_attn; a pipeline folder works too."""
    _, folder = sdxl
    vae = tmp_path / "pipe" / "vae"
    shutil.copytree(folder, vae)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for k, v in read_safetensors(f"{folder}/diffusion_pytorch_model.safetensors").items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        tensors[k] = np.array(v)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    write_safetensors(str(vae / "diffusion_pytorch_model.safetensors"), tensors)
    _, params = load_vae(str(tmp_path / "pipe"))
    _assert_same_tree(params, load_vae(folder)[1])


def test_bf16_and_remat(sdxl):
    model, folder = sdxl
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(model.decode(_nchw(z)).sample)
    m16, p16 = load_vae(folder, parts=("decoder",), dtype=jnp.bfloat16)
    out = _jit(m16, "decode")(p16, z)
    assert out.dtype == jnp.float32 and jax.tree.leaves(p16)[0].dtype == np.float32
    _assert_close(out, ref, BF16_REL_TOL, "bf16 decode")
    # Remat (for pixel-space losses that backprop through the decoder) keeps the parameter names and puts
    # checkpoints in the backward pass; values are unchanged by construction.
    remat, p = load_vae(folder, parts=("decoder",), remat_policy="nothing_saveable")
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda z: jnp.sum(remat.apply(p, z, method="decode"))))(z))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    with pytest.raises(ValueError, match="not a jax.checkpoint_policies name"):
        load_vae(folder, parts=("decoder",), remat_policy="everything_please")


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the file and the field/tensor.


def _copy(folder, tmp_path, config_update=None, drop=None):
    dst = tmp_path / "vae"
    shutil.copytree(folder, dst)
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        path = str(dst / "diffusion_pytorch_model.safetensors")
        write_safetensors(path, {k: np.array(v) for k, v in read_safetensors(path).items() if k != drop})
    return str(dst)


@pytest.mark.parametrize(
    "update, match",
    [
        ({"up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}, r"`up_block_types` \['AttnUpDecoderB"),
        ({"act_fn": "gelu"}, r"`act_fn` = 'gelu' is not supported"),
        ({"_class_name": "AutoencoderTiny"}, r"only AutoencoderKL"),
        ({"use_tiling_magic": True}, r"unknown AutoencoderKL config fields \['use_tiling_magic'\]"),
    ],
)
def test_unsupported_config(sdxl, tmp_path, update, match):
    folder = _copy(sdxl[1], tmp_path, update)
    with pytest.raises(UnsupportedConfigError, match=match) as e:
        load_vae(folder)
    assert "config.json" in str(e.value)


def test_missing_tensor(sdxl, tmp_path):
    name = "decoder.up_blocks.1.resnets.0.norm2.weight"
    folder = _copy(sdxl[1], tmp_path, drop=name)
    with pytest.raises(WeightsError, match=rf"missing tensors \(1\): {name}"):
        load_vae(folder, parts=("decoder",))
    load_vae(folder, parts=("encoder",))  # the decoder's tensors are ignorable for an encoder-only load


def test_bad_folder_and_parts(tmp_path):
    with pytest.raises(WeightsError, match="not a folder"):
        load_vae(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="subset of"):
        load_vae(str(tmp_path), parts=("unet",))
