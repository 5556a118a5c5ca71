"""The MNIST world's VAE: a diffusers `AutoencoderKL` (our Flax port, `d2g_jax/models/vae.py`) trained in JAX.

32×32×3 images in [-1, 1] ↔ 8×8×4 latents (three blocks: downscale 4), KL-regularised as SD's first stage was:
the loss is the per-pixel L1 + L2 reconstruction error of a *posterior sample* plus `kl_weight` × the KL to N(0, I)
summed over latent elements and divided by the pixel elements (SD: summed L1 plus 1e-6 × summed KL; the weight
here is larger, see `KL_WEIGHT`, and still leaves the latents nearly deterministic). Training images come from
`recoloured_batch` (every digit in random palette colours), the train split only.

After training, the latents' standard deviation over the train split (posterior means, all elements) sets
`scaling_factor = 1 / std` in config.json, as SD's 0.18215 was chosen, so the U-Net sees unit-variance latents.

`train_vae(out_dir, splits, ...)` writes `out_dir` as a diffusers VAE folder (`config.json` +
`diffusion_pytorch_model.safetensors`, float32) that `diffusers.AutoencoderKL.from_pretrained` and
`d2g_jax.models.vae.load_vae` read, and returns the held-out reconstruction PSNR and the other metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.models.tiny import vae_config_json as tiny_vae_config_json
from d2g_jax.models.vae import AutoencoderKL, VAEConfig, abstract_params
from d2g_jax.world import train_util as tu
from d2g_jax.world.data import Split, recoloured_batch

# 16/32/32 channels, one resnet per encoder block (two per decoder block, as diffusers builds it), mid-block
# attention at 8×8: 0.24 M parameters, ~1 MB in float32.
WORLD_VAE = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4)
KL_WEIGHT = 1e-5  # × KL summed over latent elements / pixel elements (SD's 1e-6 on sums ≈ 8e-8 of this form)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def vae_config_json(c: VAEConfig, sample_size: int = 32) -> dict[str, Any]:
    """diffusers' `AutoencoderKL` config.json for `c` at the world's image size."""
    return tiny_vae_config_json(c, sample_size=sample_size)


def vae_loss(module: AutoencoderKL, params: Any, images: jax.Array, eps: jax.Array, kl_weight: float):
    """(loss, metrics) for images [B, H, W, 3] in [-1, 1]: L1 + L2 of the decoded posterior sample
    `mean + std · eps` (eps: standard normal [B, h, w, C]), plus KL."""
    dist = module.apply({"params": params}, images, method="encode")
    z = dist.mean + dist.std * eps
    recon = module.apply({"params": params}, z, method="decode")
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean(jnp.square(recon - images))
    kl = 0.5 * jnp.sum(jnp.square(dist.mean) + jnp.exp(dist.logvar) - 1.0 - dist.logvar) / images.shape[0]
    kl_per_pixel = kl / float(np.prod(images.shape[1:]))
    return l1 + l2 + kl_weight * kl_per_pixel, {"l1": l1, "l2": l2, "kl": kl}


def autoencode(module: AutoencoderKL, params: Any, images: np.ndarray, batch: int = 250):
    """uint8 images [N, H, W, 3] → (posterior means, float32 [N, h, w, C] in VAE latent space; uint8
    reconstructions through the means). One jitted function at one batch shape (the last chunk is padded)."""

    def fn(p, x):
        mean = module.apply({"params": p}, x, method="encode").mean
        return mean, module.apply({"params": p}, mean, method="decode")

    fn = jax.jit(fn)
    means, recons = tu.padded_batches(lambda x: fn(params, tu.to_unit(x)), images, batch)
    return means, tu.to_uint8(recons)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image PSNR (dB) of two uint8 batches [N, H, W, C] (255 peak)."""
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)), axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def train_vae(
    out_dir: str,
    splits: Mapping[str, Split],
    *,
    seed: int,
    steps: int,
    batch_size: int,
    log: tu.Log = print,
    config: VAEConfig = WORLD_VAE,
    lr: float = 1e-3,
    kl_weight: float = KL_WEIGHT,
) -> dict[str, Any]:
    """Trains the world's VAE on `splits["train"]` (re-coloured) and writes `out_dir` as a diffusers VAE folder.

    Returns {"heldout_psnr", "train_psnr", "scaling_factor", "latent_std", "latent_mean", "params", "steps",
    "batch_size", "seconds", "final_loss", "bytes"}; the folder is written under a temporary name and renamed,
    and a non-empty `out_dir` is refused before any training.
    """
    tu.check_target(out_dir)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_vae: steps ({steps}) and batch_size ({batch_size}) must be positive.")
    train, held = splits["train"], splits["heldout"]
    module = AutoencoderKL(config)
    params = tu.init_params(abstract_params(module), seed)
    n_params = tu.param_count(params)
    flat, unravel = tu.ravel(params)  # one vector: the optimiser's update is a few XLA ops, not a few per tensor
    opt, schedule = tu.adamw(lr, steps, warmup=min(100, steps // 10), weight_decay=0.0)
    opt_state = opt.init(flat)
    log(f"vae: {n_params / 1e6:.3f} M params {config.block_out_channels}, {steps} steps × {batch_size}")

    @jax.jit
    def step_fn(flat, opt_state, images, eps):
        loss_fn = lambda f: vae_loss(module, unravel(f), images, eps, kl_weight)
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(flat)
        updates, opt_state = opt.update(grads, opt_state, flat)
        return flat + updates, opt_state, dict(m, loss=loss)

    rng = np.random.default_rng([seed, 1])
    rows = tu.epoch_rows(len(train), batch_size, rng)
    side = train.images.shape[1] // config.downscale
    progress = tu.Progress("vae", steps, log, every=max(1, steps // 20))
    metrics: dict[str, Any] = {}
    for step in range(steps):
        images, _, _ = recoloured_batch(train, next(rows), rng)
        # The posterior-sample noise is drawn on the host: no RNG inside the compiled step (XLA:CPU compile time).
        eps = rng.standard_normal((batch_size, side, side, config.latent_channels), np.float32)
        flat, opt_state, metrics = step_fn(flat, opt_state, tu.to_unit(images), eps)
        progress(step, **{k: float(v) for k, v in metrics.items()}, lr=float(schedule(step)))
    seconds = progress.seconds
    params = jax.device_get(unravel(flat))

    chunk = min(250, len(train))  # one batch shape for both splits: one compile
    means, recon = autoencode(module, params, train.images, chunk)
    std, mean = float(np.std(means)), float(np.mean(means))
    config = dataclasses.replace(config, scaling_factor=1.0 / std)
    held_psnr = psnr(autoencode(module, params, held.images, chunk)[1], held.images)
    train_psnr = psnr(recon, train.images)
    log(f"vae: held-out PSNR {held_psnr:.2f} dB (train {train_psnr:.2f}), latent std {std:.4f} mean {mean:.4f} "
        f"→ scaling_factor {1 / std:.5f}")  # fmt: skip

    tmp = tu.fresh_folder(out_dir)
    tu.write_model_folder(tmp, vae_config_json(config), params, WEIGHTS)
    result = {
        "heldout_psnr": held_psnr,
        "train_psnr": train_psnr,
        "scaling_factor": 1.0 / std,
        "latent_std": std,
        "latent_mean": mean,
        "params": n_params,
        "steps": steps,
        "batch_size": batch_size,
        "seconds": seconds,
        "final_loss": float(metrics["loss"]),
        "bytes": tu.folder_bytes(tmp),
    }
    with open(os.path.join(tmp, "train_info.json"), "w") as f:
        json.dump(result, f, indent=2)
    tu.publish_folder(tmp, out_dir)
    return result
