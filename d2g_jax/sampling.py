"""DDIM schedule math and the teacher's ODE sampler that builds Diffusion2GAN's (noise, prompt, latent) pairs.

Paper §3.1 (eq. 1: the target `x` is the teacher's DDIM ODE solution from noise `z`), §4 "Training details"
(50 DDIM steps, CFG 3 / 8 for SD1.5, 7 for SDXL) and Appendix A eq. 7-8 (the generator's data parameterisation
`G(z, c) = (z − σ_T ε(z, c, T)) / α_T`, helpers `alpha_sigma` and `last_timestep`).

* `DDIMSchedule`: diffusers' `DDIMScheduler` (eta = 0) as a frozen, hashable value built from a
  `scheduler_config.json` with `DDIMScheduler.from_config` semantics (a PNDM/Euler config of an SD/SDXL
  folder gives DDIM with the shared fields). Betas, `alphas_cumprod`, `final_alpha_cumprod`, the timesteps of
  each spacing and the step itself follow diffusers line by line, including its quirk that the previous
  timestep is always `t − num_train_timesteps // num_steps`, whatever the spacing.
* `ddim_sample`: the whole sampling loop as one jitted `lax.scan`. With CFG the unconditional and conditional
  halves go through ONE U-Net call (batch `[uncond; cond]`, as diffusers concatenates them) and are mixed as
  `ε_u + s (ε_c − ε_u)`; SDXL's added conditions (pooled text embeds, size/crop `time_ids`) go to both halves.
* `Teacher`: a loaded SD/SDXL pipeline folder (U-Net params, text encoders, schedule) plus a fingerprint
  of its files, the unit `d2g_jax.data.pairs_writer` generates pairs with.

Shapes: latents/noise `[B, h, w, 4]` (NHWC, h = H / vae_scale_factor); text context `[B, S, D]`;
SDXL pooled `[B, P]`; `time_ids [B, 6]`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Conditioning = Mapping[str, jax.Array]  # {"context": [B, S, D], "pooled": [B, P] (SDXL), "time_ids": [B, 6] opt.}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# StableDiffusion(Img2Img|Inpaint)Pipeline.__init__ rewrites outdated scheduler configs in memory
# (steps_offset → 1, clip_sample → False); the SDXL pipelines do not.
_SD_LEGACY_FIXUP_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)


class ScheduleError(ValueError):
    """A scheduler config this port cannot reproduce exactly (the error names the file and field)."""


@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
    """`diffusers.DDIMScheduler` hyperparameters (same names and defaults); eta = 0 (deterministic ODE).

    Hashable, so it can be a static argument of `jax.jit`. Arrays derived from it are computed once on the host
    in the precision diffusers uses (betas in float32, `alphas_cumprod` accumulated in float64 → float32, as
    torch's CPU `cumprod` does).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        self._validate("DDIMSchedule")

    def _validate(self, source: str) -> None:
        checks = (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("timestep_spacing", self.timestep_spacing, SPACINGS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
        )
        for field, value, allowed in checks:
            if field == "beta_schedule" and self.trained_betas is not None:
                continue
            if value not in allowed:
                raise ScheduleError(f"{source}: `{field}` = {value!r} is not supported (supported: {allowed}).")
        if self.num_train_timesteps <= 0:
            raise ScheduleError(f"{source}: `num_train_timesteps` must be positive, got {self.num_train_timesteps}.")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ScheduleError(
                f"{source}: `trained_betas` has {len(self.trained_betas)} entries for "
                f"num_train_timesteps={self.num_train_timesteps}."
            )

    # ------------------------------------------------------------------------------------------------------
    # Construction from diffusers configs.

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str = "scheduler_config.json") -> DDIMSchedule:
        """`DDIMScheduler.from_config(cfg)`: shared fields are taken, missing ones get DDIM's defaults.

        Fields listed in the config's `_use_default_values` are ignored (diffusers does the same). Raises
        `ScheduleError` naming `source` and the field for `thresholding=True` (dynamic thresholding is for
        pixel-space models; the SD/SDXL teachers never use it) and unknown schedule/spacing/prediction types.
        """
        if not isinstance(cfg, Mapping):
            raise ScheduleError(f"{source}: expected a JSON object, got {type(cfg).__name__}.")
        used_defaults = set(cfg.get("_use_default_values", ()) or ())
        cfg = {k: v for k, v in cfg.items() if k not in used_defaults}
        if cfg.get("thresholding", False):
            raise ScheduleError(f"{source}: `thresholding` = true (dynamic thresholding) is not supported.")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if cfg.get(f.name) is not None:
                kw[f.name] = cfg[f.name]
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        try:
            out = cls(**kw)
        except ScheduleError as e:
            raise ScheduleError(str(e).replace("DDIMSchedule", source, 1)) from None
        except TypeError as e:
            raise ScheduleError(f"{source}: invalid scheduler config ({e}).") from e
        if cfg.get("_class_name") not in (None, "DDIMScheduler"):
            logging.info("%s: %s config, building DDIM from its shared fields.", source, cfg.get("_class_name"))
        return out

    @classmethod
    def from_pipeline(cls, folder: str) -> DDIMSchedule:
        """Reads `folder/scheduler/scheduler_config.json` of a diffusers pipeline folder.

        For the SD1.x/2.x pipelines (per `model_index.json`) it applies the same in-memory fix-ups the diffusers
        pipeline applies to outdated configs (steps_offset → 1, clip_sample → False), with a warning.
        """
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        cfg = _read_json(path, "the pipeline's scheduler config")
        pipeline = None
        index_path = os.path.join(folder, "model_index.json")
        if os.path.isfile(index_path):
            pipeline = _read_json(index_path, "the pipeline index").get("_class_name")
        if pipeline in _SD_LEGACY_FIXUP_PIPELINES:
            cfg = dict(cfg)
            if cfg.get("steps_offset", 1) != 1:
                logging.warning("%s: steps_offset=%s; %s uses 1 (diffusers' fix-up).", path, cfg["steps_offset"],
                                pipeline)  # fmt: skip
                cfg["steps_offset"] = 1
            if cfg.get("clip_sample", False) is True:
                logging.warning("%s: clip_sample=true; %s uses false (diffusers' fix-up).", path, pipeline)
                cfg["clip_sample"] = False
        return cls.from_config(cfg, source=path)

    # ------------------------------------------------------------------------------------------------------
    # Derived arrays (host numpy, float32 as in diffusers).

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """[N] float32 β_t."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n).astype(np.float32)
        elif self.beta_schedule == "scaled_linear":
            root = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n).astype(np.float32)
            betas = root * root
        else:  # squaredcos_cap_v2: Glide's cosine schedule, computed in Python floats as diffusers does
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """[N] float32 ᾱ_t = Π_{s≤t} (1 − β_s) (float64 accumulation, like torch's CPU cumprod)."""
        alphas = np.float32(1.0) - self.betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """ᾱ used after the last step: 1 (`set_alpha_to_one`) or ᾱ_0."""
        return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial noise (1 for DDIM; kept so the sampler mirrors the diffusers pipeline)."""
        return 1.0

    def timesteps(self, num_steps: int) -> np.ndarray:
        """[S] int64 timesteps of `set_timesteps(num_steps)`, descending."""
        n = self.num_train_timesteps
        if not 0 < num_steps <= n:
            raise ValueError(f"num_steps must be in [1, {n}] (num_train_timesteps), got {num_steps}.")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = n // num_steps
            ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
        return ts

    def prev_timesteps(self, num_steps: int) -> np.ndarray:
        """[S] int64 `t − N // S` for each step (negative → `final_alpha_cumprod`), as `DDIMScheduler.step`."""
        return self.timesteps(num_steps) - self.num_train_timesteps // num_steps

    def step_coefficients(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per step `(t, ᾱ_t, ᾱ_prev)`, each [S] float32: the scan's inputs."""
        ts, prev = self.timesteps(num_steps), self.prev_timesteps(num_steps)
        ac = self.alphas_cumprod
        if ts.max() >= self.num_train_timesteps:
            raise ValueError(
                f"timestep {ts.max()} ≥ num_train_timesteps={self.num_train_timesteps} (steps_offset "
                f"{self.steps_offset} with {num_steps} steps); diffusers would index out of range too."
            )
        a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], self.final_alpha_cumprod).astype(np.float32)
        return ts.astype(np.float32), ac[ts], a_prev

    def step(
        self, model_output: jax.Array, timestep: int, sample: jax.Array, num_steps: int
    ) -> tuple[jax.Array, jax.Array]:
        """One `DDIMScheduler.step(model_output, timestep, sample)` (eta = 0) → (prev_sample, pred_x0).

        Host convenience for tests and notebooks; `ddim_sample` uses `ddim_update` with precomputed ᾱ's.
        """
        prev = int(timestep) - self.num_train_timesteps // num_steps
        a_t = self.alphas_cumprod[int(timestep)]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return ddim_update(self, model_output, sample, a_t, a_prev)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' `rescale_zero_terminal_snr` (Lin et al. 2024, Alg. 1), float32 like the original."""
    alphas = np.float32(1.0) - betas
    abar_sqrt = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
    a0, at = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - at) * (a0 / (a0 - at))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _read_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ScheduleError(f"{path}: missing ({what}).")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{path}: invalid JSON ({e}).") from e


# ----------------------------------------------------------------------------------------------------------
# Pure step math.


def ddim_update(
    schedule: DDIMSchedule, model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array, alpha_prev: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """DDIM (eta = 0) from x_t to x_prev given ᾱ_t, ᾱ_prev: returns (x_prev, x0_pred), float32.

    The prediction → (x0, ε) conversion is diffusers' for epsilon, v_prediction and sample models.
    """
    x = jnp.asarray(sample, jnp.float32)
    out = jnp.asarray(model_output, jnp.float32)
    a_t = jnp.asarray(alpha_t, jnp.float32)
    a_prev = jnp.asarray(alpha_prev, jnp.float32)
    b_t = 1 - a_t
    if schedule.prediction_type == "epsilon":
        x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
    elif schedule.prediction_type == "sample":
        x0 = out
        eps = (x - a_t**0.5 * x0) / b_t**0.5
    else:  # v_prediction
        x0 = a_t**0.5 * x - b_t**0.5 * out
        eps = a_t**0.5 * out + b_t**0.5 * x
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps, x0


def alpha_sigma(schedule: DDIMSchedule, t: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) for integer timestep(s) `t` (traceable): x_t = α_t x_0 + σ_t ε."""
    ac = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
    return jnp.sqrt(ac), jnp.sqrt(1 - ac)


def last_timestep(schedule: DDIMSchedule) -> int:
    """T of paper eq. 8, the teacher's last training timestep (`num_train_timesteps − 1`, 999 for SD)."""
    return schedule.num_train_timesteps - 1


def sdxl_time_ids(height: int, width: int, batch: int) -> jax.Array:
    """[B, 6] float32 `(H, W, 0, 0, H, W)`: SDXL's original size, crop top-left, target size, in pixels."""
    return jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (batch, 1))


# ----------------------------------------------------------------------------------------------------------
# The sampler.


def _added_conds(cond: Conditioning, batch: int, pixel_hw: tuple[int, int]) -> dict[str, jax.Array]:
    """SDXL `text_embeds`/`time_ids` for one half of the CFG batch ({} for SD conditioning)."""
    if cond.get("pooled") is None:
        return {}
    time_ids = cond.get("time_ids")
    if time_ids is None:
        time_ids = sdxl_time_ids(*pixel_hw, batch)
    return {"text_embeds": jnp.asarray(cond["pooled"], jnp.float32), "time_ids": jnp.asarray(time_ids, jnp.float32)}


def _check_cond(cond: Conditioning, batch: int, what: str) -> None:
    if not isinstance(cond, Mapping) or "context" not in cond:
        raise ValueError(f"{what} must be a mapping with 'context' [B, S, D] (and 'pooled' [B, P] for SDXL).")
    for k, v in cond.items():
        if v is not None and np.shape(v)[0] != batch:
            raise ValueError(f"{what}[{k!r}] has batch {np.shape(v)[0]}, the noise has {batch}.")


@functools.partial(jax.jit, static_argnames=("unet_apply", "schedule", "use_cfg"))
def _ddim_scan(unet_apply, params, x, context, added, guidance_scale, coeffs, schedule, use_cfg):
    def body(x, c):
        t, a_t, a_prev = c
        x_in = jnp.concatenate([x, x], axis=0) if use_cfg else x
        out = unet_apply(params, x_in, t, context, **added).astype(jnp.float32)
        if use_cfg:
            out_u, out_c = jnp.split(out, 2, axis=0)
            out = out_u + guidance_scale * (out_c - out_u)
        x, _ = ddim_update(schedule, out, x, a_t, a_prev)
        return x, None

    x, _ = jax.lax.scan(body, x, coeffs)
    return x


def ddim_sample(
    unet_apply: Callable[..., jax.Array],
    params: Any,
    noise: jax.Array,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    schedule: DDIMSchedule,
    num_steps: int,
    *,
    vae_scale_factor: int = 8,
) -> jax.Array:
    """Deterministic DDIM from `noise` to the teacher's ODE solution x0, as the diffusers SD/SDXL pipelines.

    Args:
      unet_apply: `module.apply` of the teacher U-Net: `(params, x [B', h, w, 4], t [], context [B', S, D],
        text_embeds=, time_ids=) → [B', h, w, 4]` (hashable: it is a static jit argument).
      params: its variables (`{"params": ...}`), possibly sharded (replicated) across devices.
      noise: [B, h, w, 4] initial latent x_T (multiplied by `init_noise_sigma` = 1, as the pipeline does).
      cond: conditional embeddings `{"context": [B, S, D], "pooled": [B, P] (SDXL)}`, optional
        `"time_ids": [B, 6]` (default: `(H, W, 0, 0, H, W)` with H, W = h, w × `vae_scale_factor`).
      uncond: the same for the unconditional branch (ignored, may be None, when `guidance_scale` ≤ 1).
      guidance_scale: CFG scale s; > 1 runs `[uncond; cond]` in one batched U-Net call per step and uses
        `ε_u + s (ε_c − ε_u)`; ≤ 1 runs the conditional branch only (diffusers' rule).
      schedule: the DDIM schedule; num_steps: number of DDIM steps S.
      vae_scale_factor: latent → pixel factor for SDXL's default `time_ids`.

    Returns:
      [B, h, w, 4] float32 final latent x0 (the pipeline's `output_type="latent"`).
    """
    noise = jnp.asarray(noise)
    if noise.ndim != 4:
        raise ValueError(f"noise must be [B, h, w, C], got shape {noise.shape}.")
    b, h, w = noise.shape[:3]
    use_cfg = float(guidance_scale) > 1.0
    _check_cond(cond, b, "cond")
    pixel_hw = (h * vae_scale_factor, w * vae_scale_factor)
    context = jnp.asarray(cond["context"], jnp.float32)
    added = _added_conds(cond, b, pixel_hw)
    if use_cfg:
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs `uncond` embeddings.")
        _check_cond(uncond, b, "uncond")
        if (cond.get("pooled") is None) != (uncond.get("pooled") is None):
            raise ValueError("cond and uncond must both carry 'pooled' (SDXL) or neither.")
        context = jnp.concatenate([jnp.asarray(uncond["context"], jnp.float32), context], axis=0)
        added_u = _added_conds(uncond, b, pixel_hw)
        added = {k: jnp.concatenate([added_u[k], v], axis=0) for k, v in added.items()}
    coeffs = tuple(jnp.asarray(c) for c in schedule.step_coefficients(num_steps))
    x = noise.astype(jnp.float32) * schedule.init_noise_sigma
    return _ddim_scan(unet_apply, params, x, context, added, jnp.float32(guidance_scale), coeffs, schedule, use_cfg)


# ----------------------------------------------------------------------------------------------------------
# The teacher bundle.


class Conditioner(Protocol):
    """Turns prompts into U-Net conditioning (`d2g_jax.models.text.TextEncoder` implements it)."""

    def encode(self, prompts: Sequence[str]) -> dict[str, jax.Array]: ...

    def encode_negative(self, batch: int) -> dict[str, jax.Array]: ...


def pipeline_fingerprint(
    folder: str,
    components: Sequence[str] = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
) -> dict:
    """Identity of a teacher pipeline folder without hashing gigabytes: sha256 of its JSON/text configs
    (model_index, component configs, tokenizer vocab/merges) and the byte size of every weight file.

    Two folders with equal fingerprints produce the same pairs (up to a same-size weight edit, which this
    deliberately cheap check does not see). The folder path is not part of it, so a moved teacher still matches.
    """
    h = hashlib.sha256()
    sizes: dict[str, int] = {}
    names = ["model_index.json"]
    for c in components:
        if os.path.isdir(os.path.join(folder, c)):
            names += sorted(os.path.join(c, f) for f in os.listdir(os.path.join(folder, c)))
    for rel in names:
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            continue
        if rel.endswith((".json", ".txt")):
            with open(path, "rb") as f:
                h.update(rel.encode() + b"\0" + f.read() + b"\0")
        else:
            sizes[rel] = os.path.getsize(path)
    return {"configs_sha256": h.hexdigest(), "weight_sizes": sizes}


def _vae_scale_factor(folder: str) -> int:
    """diffusers' `2 ** (len(vae.block_out_channels) − 1)`, 8 when the folder has no VAE config."""
    path = os.path.join(folder, "vae", "config.json")
    if not os.path.isfile(path):
        return 8
    return 2 ** (len(_read_json(path, "the VAE config").get("block_out_channels", (0,) * 4)) - 1)


@dataclasses.dataclass
class Teacher:
    """A frozen SD/SDXL teacher: U-Net + text conditioning + DDIM schedule, ready for `ddim_sample`.

    Attributes:
      unet_apply: the U-Net's `module.apply`; params: its `{"params": ...}`.
      schedule: the DDIM schedule; text: a `Conditioner` (prompts → {"context", "pooled"}).
      vae_scale_factor: pixels per latent cell (SDXL `time_ids`); latent_channels: c of the latents.
      source: the pipeline folder; fingerprint: `pipeline_fingerprint(source)`; dtype: U-Net compute dtype.
    """

    unet_apply: Callable[..., jax.Array]
    params: Any
    schedule: DDIMSchedule
    text: Conditioner
    vae_scale_factor: int = 8
    latent_channels: int = 4
    source: str = ""
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"

    @classmethod
    def from_pipeline(cls, folder: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Teacher:
        """Loads U-Net, text encoders and scheduler config of a diffusers SD/SDXL pipeline folder."""
        from d2g_jax.models.text import TextEncoder
        from d2g_jax.models.unet import load_unet

        module, params = load_unet(os.path.join(folder, "unet"), dtype=dtype, param_dtype=param_dtype)
        return cls(
            unet_apply=module.apply,
            params=jax.device_put(params),
            schedule=DDIMSchedule.from_pipeline(folder),
            text=TextEncoder.from_pipeline(folder, dtype=dtype, param_dtype=param_dtype),
            vae_scale_factor=_vae_scale_factor(folder),
            latent_channels=module.config.in_channels,
            source=os.path.abspath(folder),
            fingerprint=pipeline_fingerprint(folder),
            dtype=jnp.dtype(dtype).name,
        )

    def conditioning(self, prompts: Sequence[str], use_cfg: bool) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) embeddings for B prompts; uncond is None without CFG."""
        cond = self.text.encode(list(prompts))
        return cond, (self.text.encode_negative(len(prompts)) if use_cfg else None)

    def sample(self, noise: jax.Array, prompts: Sequence[str], guidance_scale: float, num_steps: int) -> jax.Array:
        """x0 [B, h, w, 4] for `noise` [B, h, w, 4] and B prompts (encodes the prompts, then `ddim_sample`)."""
        cond, uncond = self.conditioning(prompts, float(guidance_scale) > 1.0)
        return ddim_sample(self.unet_apply, self.params, noise, cond, uncond, guidance_scale, self.schedule,
                           num_steps, vae_scale_factor=self.vae_scale_factor)  # fmt: skip
