"""The one-step generator of Diffusion2GAN (paper §3.1, eq. 8): the teacher U-Net in the x0-parameterisation.

    G(z, c) = (z − σ_T ε(z, c, T)) / α_T          (ε-prediction teacher)
    G(z, c) = α_T z − σ_T v(z, c, T)               (v-prediction teacher: the same x0 estimate)

with T the teacher's last training timestep (999 for SD/SDXL) and (α_T, σ_T) = (√ᾱ_T, √(1 − ᾱ_T)) of the
teacher's noise schedule. G is initialised with the teacher's weights, so at step 0 it is exactly the teacher's
single-step x0 prediction from pure noise. The U-Net is not copied or wrapped as a new module: `Generator` is a
small functional adaptor around `UNet2DConditionModel.apply`, so G's params are a plain U-Net tree that exports to
diffusers unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.models.unet import UNet2DConditionModel
from d2g_jax.sampling import DDIMSchedule, last_timestep, sdxl_time_ids


@dataclasses.dataclass(frozen=True)
class Generator:
    """`G(params, z, cond) → x0`; hashable (a static argument of jitted steps).

    Attributes:
      unet: the U-Net module (its `dtype` is the compute dtype; params stay in their own dtype).
      schedule: the teacher's noise schedule (`prediction_type` epsilon or v_prediction).
      vae_scale_factor: pixels per latent cell (SDXL's `time_ids` carry the pixel size).
      timestep: the conditioning timestep T; default `last_timestep(schedule)`.
    """

    unet: UNet2DConditionModel
    schedule: DDIMSchedule
    vae_scale_factor: int = 8
    timestep: int | None = None

    def __post_init__(self):
        if self.schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type={self.schedule.prediction_type!r}: the generator's x0 "
                             "parameterisation supports 'epsilon' and 'v_prediction' teachers.")  # fmt: skip
        alpha, sigma = self.alpha_sigma
        if self.schedule.prediction_type == "epsilon" and alpha < 1e-6:
            raise ValueError(f"ᾱ_T = {alpha**2:.3g} at T={self.t}: an ε-prediction teacher cannot be turned into an "
                             "x0 predictor at a zero-SNR timestep (rescale_betas_zero_snr); use a v-prediction "
                             "teacher or an earlier timestep.")  # fmt: skip

    @property
    def t(self) -> int:
        return last_timestep(self.schedule) if self.timestep is None else int(self.timestep)

    @property
    def alpha_sigma(self) -> tuple[float, float]:
        """(α_T, σ_T) as Python floats (from the float32 `alphas_cumprod`, as diffusers computes them)."""
        ac = float(np.asarray(self.schedule.alphas_cumprod, np.float32)[self.t])
        return float(np.sqrt(np.float32(ac))), float(np.sqrt(np.float32(1.0 - ac)))

    def added_conditions(self, cond: Mapping[str, jax.Array], b: int, h: int, w: int) -> dict[str, jax.Array]:
        """SDXL's added U-Net inputs (pooled text embedding + (size, crop, size) ids) for [B, h, w] latents; {} for SD."""
        if cond.get("pooled") is None:
            return {}
        time_ids = cond.get("time_ids")
        if time_ids is None:
            time_ids = sdxl_time_ids(h * self.vae_scale_factor, w * self.vae_scale_factor, b)
        return {"text_embeds": cond["pooled"], "time_ids": time_ids}

    def unet_output(self, params: Any, z: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        """The raw U-Net prediction (ε or v) at timestep T, float32 [B, h, w, c]."""
        b, h, w = z.shape[:3]
        added = self.added_conditions(cond, b, h, w)
        t = jnp.full((b,), self.t, jnp.int32)
        out = self.unet.apply({"params": params}, z.astype(self.unet.dtype), t, cond["context"], **added)
        return out.astype(jnp.float32)

    def __call__(self, params: Any, z: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        """x0 [B, h, w, c] (float32) from noise z [B, h, w, c] and text conditioning `{"context", "pooled"}`."""
        alpha, sigma = self.alpha_sigma
        out = self.unet_output(params, z, cond)
        z = z.astype(jnp.float32)
        if self.schedule.prediction_type == "epsilon":
            return (z - sigma * out) / alpha
        return alpha * z - sigma * out
