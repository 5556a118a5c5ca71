"""Parity of E-LatentLPIPS (and pixel LPIPS) with the official PyTorch packages, loaded from the official
checkpoint layouts; augmentation replayed from the official run's own random draws; loss properties."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import nchw, replay_official_draws

from d2g_jax.losses.elatentlpips import checkpoint_files, e_latent_lpips, load_latent_lpips, pixel_lpips
from d2g_jax.losses.latent_vgg import load_pixel_lpips
from d2g_jax.models.weights import WeightsError

REL_TOL = 1e-5  # fp32, relative to each distance (issue 4)
STATIC = ("preset", "l1", "normalize", "encoder", "mode", "p", "return_layers", "dtype")
dist = jax.jit(e_latent_lpips, static_argnames=STATIC)  # one compile per option set (eager is slower here)
B, H, W = 2, 8, 12  # non-square so an H/W mix-up shows; taps at 8×12 (×3), 4×6, 2×3


def _latents(channels: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((B, H, W, channels)).astype(np.float32) * scale
    x1 = (x0 + 0.7 * rng.standard_normal(x0.shape) * scale).astype(np.float32)
    return x0, x1


def _official(model, x0, x1, **kw):
    with torch.no_grad():
        val, res = model(nchw(x0), nchw(x1), retPerLayer=True, **kw)
    return val.numpy().reshape(-1), np.stack([r.numpy().reshape(-1) for r in res], axis=-1)


def _assert_close(ours, ref, what):
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=REL_TOL, atol=0, err_msg=what)


@pytest.mark.parametrize("encoder", ["sd15", "sd3"])
def test_plain_matches_official_per_layer_and_total(official, encoder):
    model, ckpt = official(encoder)
    module, variables = load_latent_lpips(ckpt, encoder)
    scale = 1 / 0.18215 if encoder == "sd15" else 1.0  # raw encoder outputs for normalize=True
    x0, x1 = _latents(module.in_channels, seed=3, scale=scale)
    for normalize in (False, True):
        for l1 in (False, True):
            ref_total, ref_layers = _official(model, x0, x1, normalize=normalize, ensembling=False, add_l1_loss=l1)
            total, layers = dist(
                variables, jnp.asarray(x0), jnp.asarray(x1), encoder=encoder, mode="plain", l1=l1,
                normalize=normalize, return_layers=True,
            )  # fmt: skip
            what = f"{encoder} normalize={normalize} l1={l1}"
            _assert_close(layers, ref_layers, what + " per layer")
            _assert_close(total, ref_total, what + " total")


def test_ensemble_matches_official_with_replayed_augmentation(official):
    model, ckpt = official("sd15")
    _, variables = load_latent_lpips(ckpt, "sd15")
    x0, x1 = _latents(4, seed=5)
    for seed in (0, 1):
        torch.manual_seed(seed)
        ref_total, ref_layers = _official(model, x0, x1, ensembling=True, add_l1_loss=True)
        prm = replay_official_draws(seed, B, H, W)
        total, layers = dist(
            variables, jnp.asarray(x0), jnp.asarray(x1), preset="bgco", mode="ensemble", aug_params=prm,
            return_layers=True,
        )  # fmt: skip
        # The augmentation's warp adds ~1e-6 absolute float noise that the loss divides by small per-layer
        # distances; the warp itself is compared at 1e-5 in augment_test.
        _assert_close(layers, ref_layers, f"ensemble seed {seed} per layer")
        _assert_close(total, ref_total, f"ensemble seed {seed} total")


def test_identical_inputs_give_zero_and_star_is_the_mean(official):
    _, ckpt = official("sd15")
    _, variables = load_latent_lpips(ckpt, "sd15")
    x0, x1 = map(jnp.asarray, _latents(4, seed=9))
    key = jax.random.PRNGKey(0)
    for mode in ("plain", "ensemble", "star"):
        d = dist(variables, x0, x0, key, mode=mode)
        np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-6, err_msg=mode)
    plain = dist(variables, x0, x1, mode="plain")
    ens = dist(variables, x0, x1, key, mode="ensemble")
    star = dist(variables, x0, x1, key, mode="star")
    np.testing.assert_allclose(np.asarray(star), (np.asarray(plain) + np.asarray(ens)) / 2, rtol=1e-5)
    assert np.all(np.asarray(ens) > 0) and not np.allclose(np.asarray(ens), np.asarray(plain))


def test_gradients_flow_under_jit(official):
    _, ckpt = official("sd15")
    _, variables = load_latent_lpips(ckpt, "sd15")
    x0, x1 = map(jnp.asarray, _latents(4, seed=11))
    loss = lambda x, k: jnp.mean(e_latent_lpips(variables, x, x1, k, preset="bgco", mode="star"))  # noqa: E731
    g = jax.jit(jax.grad(loss))(x0, jax.random.PRNGKey(1))
    assert g.shape == x0.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_pixel_lpips_matches_lpips_package(official_pixel):
    model, vgg16_path, lin_path = official_pixel
    module, variables = load_pixel_lpips(vgg16_path, lin_path)
    rng = np.random.default_rng(2)
    img0 = rng.uniform(-1, 1, (B, 16, 24, 3)).astype(np.float32)
    img1 = np.clip(img0 + 0.3 * rng.standard_normal(img0.shape), -1, 1).astype(np.float32)
    ref_total, ref_layers = _official(model, img0, img1)
    layers = jax.jit(module.apply)(variables, jnp.asarray(img0), jnp.asarray(img1))
    _assert_close(layers, ref_layers, "pixel per layer")
    _assert_close(layers.sum(-1), ref_total, "pixel total")
    # pixel_lpips = LPIPS of the decoded latents; a stand-in decoder (the VAE port has its own parity tests).
    decode = lambda z: jnp.repeat(jnp.repeat(jnp.tanh(z[..., :3]), 8, axis=1), 8, axis=2)  # noqa: E731
    z0, z1 = (jnp.asarray(z[:, :2, :3]) for z in _latents(4, seed=4))
    np.testing.assert_allclose(
        np.asarray(jax.jit(pixel_lpips, static_argnums=3)(variables, z0, z1, decode)),
        np.asarray(jax.jit(module.apply)(variables, decode(z0), decode(z1)).sum(-1)), rtol=1e-6,
    )  # fmt: skip


def test_errors(official, tmp_path):
    with pytest.raises(WeightsError) as e:
        load_latent_lpips(str(tmp_path), "sd15")
    msg = str(e.value)
    assert "sd15_latent_vgg16.pth.tar: missing E-LatentLPIPS checkpoint" in msg
    url = "https://huggingface.co/Mingguksky/elatentlpips/resolve/main/elatentlpips_ckpt/sd15_latent_vgg16.pth.tar"
    assert url in msg
    assert str(tmp_path) in msg
    _, ckpt = official("sd15")
    for src, dst in zip(checkpoint_files(ckpt, "sd15"), checkpoint_files(str(tmp_path), "sd3")):
        shutil.copy(src, dst)
    with pytest.raises(WeightsError, match="first conv takes 4 latent channels, encoder 'sd3' has 16"):
        load_latent_lpips(str(tmp_path), "sd3")
    _, variables = load_latent_lpips(ckpt, "sd15")
    x4, x16 = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 16))
    with pytest.raises(ValueError, match="encoder 'sd15' latents have 4 channels"):
        e_latent_lpips(variables, x16, x16, mode="plain")
    with pytest.raises(ValueError, match="unknown encoder 'sd4'"):
        e_latent_lpips(variables, x4, x4, mode="plain", encoder="sd4")
    with pytest.raises(ValueError, match="unknown mode 'mean'"):
        e_latent_lpips(variables, x4, x4, mode="mean")
    with pytest.raises(ValueError, match="unknown augmentation preset 'bgx'"):
        e_latent_lpips(variables, x4, x4, jax.random.PRNGKey(0), preset="bgx")
    with pytest.raises(ValueError, match="needs an rng key"):
        e_latent_lpips(variables, x4, x4, mode="ensemble")
