"""The multi-scale conditional diffusion discriminator of Diffusion2GAN (paper §3.3, Fig. 7, Table 2) and its
losses: non-saturating GAN loss, single-sample lazy R1, mix-and-match augmentation.

D(c, z, x) is the teacher U-Net (weights copied, ε-prediction parameterisation kept), reused through the seam of
`UNet2DConditionModel` (`down_block_additional_inputs`, `return_features`), never copied:

* text `c`: the U-Net's own cross-attention (and SDXL's pooled/size conditions);
* noise `z` (`z_cond`): one zero-initialised 3×3 conv `z → C₀` added to the hidden state right after `conv_in`;
* multi-scale in (`multiscale_in`): the latent `x` area-resized to the resolution entering down block i ≥ 1 and
  added there through a zero-initialised 3×3 conv `x_i → C_in(i)`;
* the latent `x` itself enters through `conv_in` at the timestep `t` (0, or a noise-augmentation timestep).

Read-outs, each a map of per-location logits:

* the U-Net's own output `[B, H, W, C_out]` (every element a logit; the plain "diffusion D" of Table 2);
* multi-scale out (`multiscale_out`): at every decoder scale three heads (GroupNorm → SiLU → 1×1 conv → 1): from the
  skip-connection features the up block consumes (concatenated), from the upsampled bottleneck path entering it,
  and from the combined features it produces.

Because every added input is zero-initialised, the initial D's U-Net output equals the teacher's ε-prediction
on the same (x, t, c). The GAN loss is taken at every location of every map, averaged per map, then averaged
over the maps (each map weighs the same whatever its resolution).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.models.blocks import conv, group_norm
from d2g_jax.models.unet import UNet2DConditionModel, dummy_inputs

MIX_MATCH_TYPES = ("noise", "text", "both")


def _zero_conv(features: int, *, dtype, param_dtype, name: str | None = None) -> nn.Conv:
    return nn.Conv(
        features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                 ("conv_h", "conv_w", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )  # fmt: skip


class Readout(nn.Module):
    """GroupNorm → SiLU → 1×1 conv: features [B, h, w, C] → logits [B, h, w, 1] (float32)."""

    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = math.gcd(self.groups, f.shape[-1])
        h = nn.silu(group_norm(groups, self.eps, name="norm", **kw)(f))
        return conv(1, kernel=1, name="conv", **kw)(h).astype(jnp.float32)


def down_block_sizes(config, h: int, w: int) -> list[tuple[int, int]]:
    """Spatial size of the hidden state entering each down block (stride-2 convs: ceil halving)."""
    sizes = [(h, w)]
    for _ in range(len(config.block_out_channels) - 1):
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def resize_latent(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Area (box-average) resize of [B, H, W, C] to `size` when the factor is an integer, else antialiased
    bilinear (`jax.image.resize`)."""
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    fh, fw = h // size[0], w // size[1]
    if fh * size[0] == h and fw * size[1] == w:
        return x.reshape(b, size[0], fh, size[1], fw, c).mean(axis=(2, 4))
    return jax.image.resize(x, (b, *size, c), "linear", antialias=True)


class Discriminator(nn.Module):
    """D(x, z, t, c) → tuple of logit maps (see the module docstring).

    Attributes:
      unet: the U-Net module (its params live under `"unet"`: the teacher's tree, unchanged).
      z_cond: condition on the generator's input noise through the zero-initialised `z_conv`.
      multiscale_in: inject the resized latent at every down block (`input_proj_{i}`, zero-initialised).
      multiscale_out: three read-outs per decoder scale (`readout_{skip,up,out}_{j}`).
    """

    unet: UNet2DConditionModel
    z_cond: bool = True
    multiscale_in: bool = True
    multiscale_out: bool = True

    def setup(self):
        c = self.unet.config
        kw = dict(dtype=self.unet.dtype, param_dtype=self.unet.param_dtype)
        boc = c.block_out_channels
        if self.z_cond:
            self.z_conv = _zero_conv(boc[0], **kw)
        if self.multiscale_in:
            self.input_proj = [_zero_conv(boc[i - 1], **kw) for i in range(1, len(boc))]
        if self.multiscale_out:
            head = lambda: Readout(c.norm_num_groups, c.norm_eps, **kw)
            n = len(c.up_block_types)
            self.readout_skip = [head() for _ in range(n)]
            self.readout_up = [head() for _ in range(n)]
            self.readout_out = [head() for _ in range(n)]

    def __call__(self, x, z, timesteps, context, text_embeds=None, time_ids=None) -> tuple[jax.Array, ...]:
        c = self.unet.config
        dt = self.unet.dtype
        extra: list[jax.Array | None] = [None] * len(c.block_out_channels)
        if self.z_cond:
            extra[0] = self.z_conv(z.astype(dt))
        if self.multiscale_in:
            sizes = down_block_sizes(c, x.shape[1], x.shape[2])
            for i, proj in enumerate(self.input_proj, start=1):
                extra[i] = proj(resize_latent(x.astype(jnp.float32), sizes[i]).astype(dt))
        out, feats = self.unet(x, timesteps, context, text_embeds, time_ids,
                               down_block_additional_inputs=tuple(extra), return_features=True)  # fmt: skip
        maps = [out.astype(jnp.float32)]
        if self.multiscale_out:
            for j, up in enumerate(feats.up):
                skips = jnp.concatenate([s.astype(dt) for s in up.skips], axis=-1)
                maps += [self.readout_skip[j](skips), self.readout_up[j](up.hidden_in), self.readout_out[j](up.out)]
        return tuple(maps)


def discriminator_inputs(unet_config, batch: int = 1) -> dict[str, Any]:
    """Abstract inputs for `Discriminator.init` / `jax.eval_shape` (parameter shapes are size independent)."""
    kw = dummy_inputs(unet_config, batch)
    return dict(x=kw["sample"], z=kw["sample"], timesteps=kw["timesteps"], context=kw["encoder_hidden_states"],
                text_embeds=kw.get("text_embeds"), time_ids=kw.get("time_ids"))  # fmt: skip


def abstract_disc_variables(disc: Discriminator) -> dict[str, Any]:
    """`jax.eval_shape` of `disc.init`: the boxed variable tree, no FLOPs spent."""
    inputs = discriminator_inputs(disc.unet.config)
    return jax.eval_shape(lambda kw: disc.init(jax.random.key(0), **kw), inputs)


def init_disc_params(disc: Discriminator, unet_params: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """D's initial params (host numpy): the teacher's U-Net tree under `"unet"`, zeros for `z_conv` and
    `input_proj_*`, and LeCun-normal 1×1 read-outs (unit GroupNorm, zero biases). No U-Net init is run."""
    abstract = nn.unbox(abstract_disc_variables(disc))["params"]
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {}
    for name, sub in abstract.items():
        if name == "unet":
            params[name] = unet_params
            continue
        if name.startswith("readout_"):
            k = sub["conv"]["kernel"]
            fan_in = int(np.prod(k.shape[:-1]))
            params[name] = {
                "norm": {"scale": np.ones(sub["norm"]["scale"].shape, k.dtype),
                         "bias": np.zeros(sub["norm"]["bias"].shape, k.dtype)},
                "conv": {"kernel": (rng.standard_normal(k.shape) / np.sqrt(fan_in)).astype(k.dtype),
                         "bias": np.zeros(sub["conv"]["bias"].shape, k.dtype)},
            }  # fmt: skip
        else:  # zero-initialised input convs
            params[name] = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), sub)
    return params


# ----------------------------------------------------------------------------------------------------------
# Losses.


def _map_mean(maps: Sequence[jax.Array], fn) -> jax.Array:
    """Mean over the maps of the per-location mean of `fn(logits)`."""
    return sum(jnp.mean(fn(m.astype(jnp.float32))) for m in maps) / len(maps)


def ns_d_loss(real: Sequence[jax.Array], fake: Sequence[jax.Array]) -> jax.Array:
    """Non-saturating D loss: softplus(−D(real)) + softplus(D(fake)) = −log σ(D(real)) − log(1 − σ(D(fake)))."""
    return _map_mean(real, lambda v: jax.nn.softplus(-v)) + _map_mean(fake, jax.nn.softplus)


def ns_g_loss(fake: Sequence[jax.Array]) -> jax.Array:
    """Non-saturating G loss (paper eq. 6): softplus(−D(G(z, c))) = −log σ(D(G(z, c)))."""
    return _map_mean(fake, lambda v: jax.nn.softplus(-v))


def mean_logit(maps: Sequence[jax.Array]) -> jax.Array:
    return _map_mean(maps, lambda v: v)


def r1_penalty(score_fn, x: jax.Array) -> jax.Array:
    """R1 (Mescheder et al. 2018): mean over the given samples of ‖∇ₓ D(x)‖², with `score_fn(x) → [n]` one score
    per sample; call it on a single sample for the paper's single-sample R1."""
    grads = jax.grad(lambda v: jnp.sum(score_fn(v)))(x.astype(jnp.float32))
    return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))


R1_REDUCES = ("sum", "mean")


def r1_score(maps: Sequence[jax.Array], reduce: str = "sum") -> jax.Array:
    """The per-sample score R1 differentiates → [B], averaged over the maps. `reduce="sum"`: StyleGAN2's
    `logits.sum()` taken over a sample's output locations (a map of L locations weighs L² in the penalty);
    `"mean"`: the mean over the locations, i.e. the score on the scale the GAN loss averages (config.disc.r1_reduce)."""
    if reduce not in R1_REDUCES:
        raise ValueError(f"config.disc.r1_reduce={reduce!r}: choose one of {R1_REDUCES}.")
    red = jnp.sum if reduce == "sum" else jnp.mean
    return sum(red(m.astype(jnp.float32), axis=tuple(range(1, m.ndim))) for m in maps) / len(maps)


EPS_MAPS = ("elements", "channel_mean", "off")


def readout_maps(maps: Sequence[jax.Array], eps_map: str = "elements") -> tuple[jax.Array, ...]:
    """The maps the GAN loss (and R1) sees, given how D's ε-map enters (config.disc.eps_map): "elements" = every
    element of the U-Net's [B, H, W, C] output a logit (C logits per location); "channel_mean" = one logit per
    location, the channel mean; "off" = not a read-out (the multi-scale heads alone; needs multiscale_out)."""
    if eps_map not in EPS_MAPS:
        raise ValueError(f"config.disc.eps_map={eps_map!r}: choose one of {EPS_MAPS}.")
    eps, heads = maps[0], tuple(maps[1:])
    if eps_map == "off":
        if not heads:
            raise ValueError("config.disc.eps_map='off' leaves D no read-out without config.disc.multiscale_out.")
        return heads
    if eps_map == "channel_mean":
        eps = jnp.mean(eps, axis=-1, keepdims=True)
    return (eps, *heads)


def image_scores(maps: Sequence[jax.Array]) -> jax.Array:
    """One real-vs-fake score per image → [B]: the mean logit over each map's locations, averaged over the maps
    (the quantity whose sign D's held-out accuracy reads)."""
    return sum(jnp.mean(m.astype(jnp.float32), axis=tuple(range(1, m.ndim))) for m in maps) / len(maps)


def mix_and_match_rows(batch: int, fraction: float, types: Sequence[str]) -> np.ndarray:
    """Row plan of D's fake batch: 0 = generated, k ≥ 1 = a real latent with mismatched `types[k − 1]`.

    The last `⌊fraction · batch + ½⌋` rows (fewer than `batch`) are replaced, cycling through `types` (static: one compile)."""
    bad = [t for t in types if t not in MIX_MATCH_TYPES]
    if bad:
        raise ValueError(f"config.disc.mix_match_types: {bad} not in {MIX_MATCH_TYPES}.")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.disc.mix_match_fraction={fraction}: must be in [0, 1).")
    m = int(np.floor(fraction * batch + 0.5)) if types else 0  # half up (Python's round() is half-to-even)
    if m >= batch:
        raise ValueError(f"config.disc.mix_match_fraction={fraction} replaces all {batch} rows of D's fake batch "
                         "(no generated sample left); use a smaller fraction.")  # fmt: skip
    plan = np.zeros(batch, np.int32)
    for r in range(m):
        plan[batch - m + r] = 1 + r % len(types)
    return plan


def mix_and_match(plan: np.ndarray, types: Sequence[str], fake: jax.Array, real: jax.Array, z: jax.Array,
                  cond: Mapping[str, jax.Array]):  # fmt: skip
    """D's fake batch after mix-and-match (paper §3.3): rows the plan marks get the row's *real* latent with the
    next row's noise ("noise"), the next row's text ("text") or both ("both": the real latent is then unrelated to
    every condition it is shown with). All of them are labelled fake.

    Returns `(x, z, cond)` for D's fake pass."""
    if not plan.any():
        return fake, z, cond
    nxt = lambda a: jnp.roll(a, -1, axis=0)  # row j's partner is row j + 1 (mod B): never itself for B ≥ 2
    plan = jnp.asarray(plan)
    replaced = plan > 0
    swap_z = jnp.zeros_like(replaced)
    swap_c = jnp.zeros_like(replaced)
    for k, t in enumerate(types, start=1):
        if t in ("noise", "both"):
            swap_z = swap_z | (plan == k)
        if t in ("text", "both"):
            swap_c = swap_c | (plan == k)
    sel = lambda m, a, b: jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    x = sel(replaced, real.astype(fake.dtype), fake)
    z2 = sel(swap_z, nxt(z), z)
    c2 = {k: (None if v is None else sel(swap_c, nxt(v), v)) for k, v in cond.items()}
    return x, z2, c2
