"""The distillation loss of a run from its config (paper §3.2, Table 1 / Table A1 "L_distil").

`load_distill_loss(config, teacher_folder) → (loss_fn, variables)` with `loss_fn(variables, x0, target, rng) → [B]`:
E-LatentLPIPS (`e_latent_lpips`, SD-CFG-8 / SDXL), E-LatentLPIPS* (`e_latent_lpips_star`: mean — or with
`loss.star_reduce="sum"` the sum — of the augmented and the plain distance, SD-CFG-3), LatentLPIPS
(`latent_lpips`), the pixel LPIPS ablation (`lpips_pixel`: VAE decode + LPIPS-VGG), `mse` or `pseudo_huber`.
The LatentVGG comes from the official files in `config.loss.ckpt_dir` (or random weights for tiny runs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

LOSS_KINDS = {
    "e_latent_lpips": "ensemble",  # E-LatentLPIPS (SD-CFG-8, SDXL-CFG-7)
    "e_latent_lpips_star": "star",  # mean of E-LatentLPIPS and LatentLPIPS (SD-CFG-3)
    "latent_lpips": "plain",  # LatentLPIPS without augmentation (ablation, Table 1)
    "lpips_pixel": None,  # VAE decode + pixel LPIPS-VGG (ablation, Table 1)
    "mse": None,  # plain MSE regression (ablation)
    "pseudo_huber": None,  # √(‖x − y‖² + c²) − c (consistency models; Table 1's Pseudo-Huber row)
}
STAR_REDUCE = ("mean", "sum")


def huber_c(config_c: float, latent_size: int) -> float:
    """Pseudo-Huber's c: `config.loss.huber_c`, or 0.00054·√d (Song & Dhariwal 2023, improved consistency training)
    for d = latent elements per sample when it is 0."""
    return float(config_c) if float(config_c) > 0 else 0.00054 * math.sqrt(latent_size)


def pseudo_huber(x: jax.Array, y: jax.Array, c: float | None = None) -> jax.Array:
    """[B]: √(‖x − y‖² + c²) − c per sample (the norm over every non-batch axis), in float32."""
    d = math.prod(x.shape[1:])
    c = huber_c(0.0, d) if c is None else float(c)
    sq = jnp.sum(jnp.square((x - y).astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
    return jnp.sqrt(sq + c * c) - c


@functools.lru_cache(maxsize=None)
def _random_lpips_cached(encoder: str, seed: int):
    from d2g_jax.losses.elatentlpips import random_latent_lpips

    return random_latent_lpips(encoder, seed)


def load_distill_loss(config: ml_collections.ConfigDict, teacher_folder: str):
    """`(loss_fn, frozen_vars)` with `loss_fn(vars, x0, target, rng) → ([B] distance, [B] eval-plain distance)`."""
    lc = config.loss
    if lc.kind not in LOSS_KINDS:
        raise ValueError(f"config.loss.kind={lc.kind!r}: choose one of {sorted(LOSS_KINDS)}.")
    dtype = jnp.dtype(lc.dtype or config.train.dtype)
    if lc.kind == "mse":
        return (lambda v, x, y, rng: jnp.mean((x - y) ** 2, axis=(1, 2, 3))), {}
    if lc.kind == "pseudo_huber":
        if float(lc.huber_c) < 0:
            raise ValueError(f"config.loss.huber_c={lc.huber_c} must be ≥ 0 (0 = 0.00054·√d).")
        return (lambda v, x, y, rng: pseudo_huber(x, y, huber_c(lc.huber_c, math.prod(x.shape[1:])))), {}
    if lc.kind == "lpips_pixel":
        from d2g_jax.losses.elatentlpips import pixel_lpips, vae_decoder
        from d2g_jax.losses.latent_vgg import load_pixel_lpips
        from d2g_jax.models.vae import load_vae

        if not (lc.pixel_vgg16 and lc.pixel_lin):
            raise ValueError("config.loss.kind='lpips_pixel' needs config.loss.pixel_vgg16 (torchvision "
                             "vgg16-397923af.pth) and config.loss.pixel_lin (lpips weights/v0.1/vgg.pth).")  # fmt: skip
        vae_mod, vae_vars = load_vae(teacher_folder, dtype=dtype, parts=("decoder",))
        _, lp_vars = load_pixel_lpips(lc.pixel_vgg16, lc.pixel_lin, dtype=dtype)

        def pixel(v, x, y, rng):
            return pixel_lpips(v["lpips"], x, y, vae_decoder(vae_mod, v["vae"]), dtype=dtype)

        return pixel, {"lpips": lp_vars, "vae": vae_vars}
    from d2g_jax.losses.elatentlpips import e_latent_lpips, load_latent_lpips

    if lc.random_weights:
        logging.warning("config.loss.random_weights=True: E-LatentLPIPS uses a RANDOM latent VGG (tiny/debug runs "
                        "only; real runs load the official checkpoints from config.loss.ckpt_dir).")  # fmt: skip
        variables = _random_lpips_cached(lc.encoder, int(config.seed))
    else:
        if not lc.ckpt_dir:
            raise ValueError("config.loss.ckpt_dir is empty: point it at the folder holding the official "
                             f"{lc.encoder}_latent_vgg16.pth.tar and {lc.encoder}_latest_vgg16_tuned.pth "
                             "(from the elatentlpips release).")  # fmt: skip
        _, variables = load_latent_lpips(lc.ckpt_dir, lc.encoder, dtype=dtype)
    mode = LOSS_KINDS[lc.kind]
    if lc.star_reduce not in STAR_REDUCE:
        raise ValueError(f"config.loss.star_reduce={lc.star_reduce!r}: choose one of {STAR_REDUCE}.")

    def latent(v, x, y, rng):
        return e_latent_lpips(v, x, y, rng, preset=lc.augment, l1=lc.l1, normalize=False, encoder=lc.encoder,
                              mode=mode, dtype=dtype, star_reduce=lc.star_reduce)  # fmt: skip

    return latent, variables
