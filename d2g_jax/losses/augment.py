"""Differentiable augmentations of E-LatentLPIPS (paper §3.2 "Ensembling", Appendix B.1, Table A1), in pure JAX.

A port of `elatentlpips.ada_aug.AdaAugment` (StyleGAN2-ADA's pipeline, Karras et al. 2020, with the colour ops
of DiffAugment, Zhao et al. 2020, as the official package has them). One random draw per example and call is
applied identically to both inputs ("generated" and "target" latents):

* **b** (pixel blitting): x-flip, 90° rotations, integer translation (≤ 1/8 of the size);
* **g** (general geometric): isotropic scale (log2 σ 0.2), pre-rotation (full circle), anisotropic scale
  (log2 σ 0.2), post-rotation, fractional translation (σ 1/8 of the size);
* **c** (colour, on every latent channel): brightness `x + U(-½, ½)`, contrast `(x - mean_CHW)·U(½, 3/2) + mean`
  (each input about its own mean), saturation `(x - mean_C)·U(0, 2) + mean` (channel mean per pixel); as in
  the official code they use one draw for both inputs and are always applied (no probability gate);
* **o** (cutout): a zeroed square of half the size centred uniformly.

All b/g ops are composed into one inverse homogeneous matrix per example and executed by ADA's single warp:
reflect-pad, 2× upsample with the orthogonal `sym6` wavelet filter, bilinear resample (zero outside), filter
and 2× downsample. Probabilities are ADA's `multiplier × p` with the global strength `p = 1` as in
elatentlpips (so every enabled op is always drawn; colour ops ignore `p` there and here).

Deviation (documented, needed under jit): the official code pads by a data-dependent margin (the max over the
batch of the transformed image corners plus the filter support, clamped to `size - 1`); a jitted program needs
static shapes, so we always pad by that clamp, `W - 1` / `H - 1`. Wherever the official samples stay inside its
own margin (it is built to make them) the two agree to float rounding; they can differ in the border pixels
only when the official margin is not clamped yet the combined scales shrink the content more than 2× along an
axis (a > 3σ draw): then the official output's outer ring samples its zero border, ours reflected content.

Layout: NHWC (`x: [B, H, W, C]`); the official package is NCHW.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The official preset table (`elatentlpips.elatentlpips.ada_augpipe`) plus 'bgo' = "bg + cutout", the
# E-LatentLPIPS* augmentation of Table A1 (SD-CFG-3), which the official table does not name.
_B = dict(xflip=1, rotate90=1, xint=1)
_G = dict(scale=1, rotate=1, aniso=1, xfrac=1)
_C = dict(brightness=1, contrast=1, saturation=1)
_O = dict(cutout=1)
PRESETS: dict[str, dict[str, float]] = {
    "b": _B,
    "g": _G,
    "c": _C,
    "o": _O,
    "co": {**_C, **_O},
    "bg": {**_B, **_G},
    "bgc": {**_B, **_G, **_C},
    "bgco": {**_B, **_G, **_C, **_O},
    "bgo": {**_B, **_G, **_O},
}
_GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")

# ADA's default ranges (AdaAugment.__init__).
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD, CUTOUT_SIZE = 0.125, 0.2, 1.0, 0.2, 0.125, 0.5

# Daubechies symlet-6 low-pass filter (ADA's `wavelets['sym6']`), normalised to unit DC gain as `setup_filter`.
_SYM6 = np.array([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
])  # fmt: skip
HZ_GEOM = (_SYM6 / _SYM6.sum()).astype(np.float32)
HZ_PAD = len(HZ_GEOM) // 4  # 3


class AugmentParams(NamedTuple):
    """One augmentation per example (a pytree; every field has leading dim B).

    g_inv: [B, 3, 3] inverse homogeneous transform, output pixel → input pixel, coordinates centred on the
      image (identity = no geometric change);
    brightness: [B] additive offset (0 = identity); contrast: [B] factor (1); saturation: [B] factor (1);
    cutout_center: [B, 2] (x, y) in [0, 1]; cutout_size: [B] side relative to the image (0 = no cutout).
    """

    g_inv: jax.Array
    brightness: jax.Array
    contrast: jax.Array
    saturation: jax.Array
    cutout_center: jax.Array
    cutout_size: jax.Array


def check_preset(preset: str) -> dict[str, float]:
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ---------------------------------------------------------------- 2-D homogeneous matrices, batched [B, 3, 3]


def _mat(rows: list[list[jax.Array | float]], b: int) -> jax.Array:
    el = [jnp.broadcast_to(jnp.asarray(e, jnp.float32), (b,)) for row in rows for e in row]
    return jnp.stack(el, axis=-1).reshape(b, 3, 3)


def translate2d(tx, ty, b: int) -> jax.Array:
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], b)


def scale2d(sx, sy, b: int) -> jax.Array:
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], b)


def rotate2d(theta, b: int) -> jax.Array:
    c, s = jnp.cos(theta), jnp.sin(theta)
    return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]], b)


def geometric_matrix(
    batch: int,
    *,
    xflip=0.0,
    rot90=0.0,
    int_shift=(0.0, 0.0),
    scale=1.0,
    rotate_pre=0.0,
    aniso=1.0,
    rotate_post=0.0,
    frac_shift=(0.0, 0.0),
) -> jax.Array:
    """ADA's composed inverse transform `G_inv` [B, 3, 3] from explicit per-example parameters (scalars or [B]).

    Args:
      xflip: 0/1; rot90: number of quarter turns (0..3); int_shift: (tx, ty) integer pixels;
      scale: isotropic factor; rotate_pre / rotate_post: angles (radians) around the anisotropic scale;
      aniso: anisotropic factor (x by `aniso`, y by `1/aniso`); frac_shift: (tx, ty) pixels.
      The composition order is ADA's (each op right-multiplies its inverse).
    """
    g = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (batch, 3, 3))
    g = g @ scale2d(1.0 / (1 - 2 * jnp.asarray(xflip, jnp.float32)), 1.0, batch)
    g = g @ rotate2d(jnp.pi / 2 * jnp.asarray(rot90, jnp.float32), batch)  # rotate2d_inv(-θ) = rotate2d(θ)
    g = g @ translate2d(-jnp.asarray(int_shift[0]), -jnp.asarray(int_shift[1]), batch)
    g = g @ scale2d(1.0 / jnp.asarray(scale, jnp.float32), 1.0 / jnp.asarray(scale, jnp.float32), batch)
    g = g @ rotate2d(jnp.asarray(rotate_pre, jnp.float32), batch)
    g = g @ scale2d(1.0 / jnp.asarray(aniso, jnp.float32), jnp.asarray(aniso, jnp.float32), batch)
    g = g @ rotate2d(jnp.asarray(rotate_post, jnp.float32), batch)
    g = g @ translate2d(-jnp.asarray(frac_shift[0]), -jnp.asarray(frac_shift[1]), batch)
    return g


# ---------------------------------------------------------------- sampling


def sample_params(rng: jax.Array, batch: int, height: int, width: int, preset: str, p: float = 1.0) -> AugmentParams:
    """Draws one augmentation per example with ADA's distributions for the preset's enabled ops."""
    cfg = check_preset(preset)
    # Two RNG calls for all draws (dozens of small calls cost seconds of XLA compile time on CPU).
    ku, kn = jax.random.split(rng)
    uni, nrm = jax.random.uniform(ku, (batch, 24)), jax.random.normal(kn, (batch, 4))
    cols = {"u": iter(range(24)), "n": iter(range(4))}

    def u(shape: tuple[int, ...] = (batch,)) -> jax.Array:
        i = [next(cols["u"]) for _ in range(int(np.prod(shape[1:])))]
        return uni[:, i].reshape(shape)

    def n(shape: tuple[int, ...] = (batch,)) -> jax.Array:
        i = [next(cols["n"]) for _ in range(int(np.prod(shape[1:])))]
        return nrm[:, i].reshape(shape)

    def gate(name: str, val: jax.Array, ident: jax.Array) -> jax.Array:  # ADA: apply with P = multiplier · p
        on = u() < cfg.get(name, 0) * p
        return jnp.where(on.reshape((-1,) + (1,) * (val.ndim - 1)), val, ident)

    zero, one = jnp.zeros((batch,)), jnp.ones((batch,))
    geo = {}
    if cfg.get("xflip"):
        geo["xflip"] = gate("xflip", jnp.floor(u() * 2), zero)
    if cfg.get("rotate90"):
        geo["rot90"] = gate("rotate90", jnp.floor(u() * 4), zero)
    if cfg.get("xint"):
        t = gate("xint", (u((batch, 2)) * 2 - 1) * XINT_MAX, jnp.zeros((batch, 2)))
        geo["int_shift"] = (jnp.round(t[:, 0] * width), jnp.round(t[:, 1] * height))
    if cfg.get("scale"):
        geo["scale"] = gate("scale", jnp.exp2(n() * SCALE_STD), one)
    if cfg.get("rotate"):
        p_rot = 1 - jnp.sqrt(jnp.clip(1 - cfg["rotate"] * p, 0, 1))  # P(pre or post) = p; p may be traced
        geo["rotate_pre"] = jnp.where(u() < p_rot, (u() * 2 - 1) * np.pi * ROTATE_MAX, zero)
    if cfg.get("aniso"):
        geo["aniso"] = gate("aniso", jnp.exp2(n() * ANISO_STD), one)
    if cfg.get("rotate"):
        geo["rotate_post"] = jnp.where(u() < p_rot, (u() * 2 - 1) * np.pi * ROTATE_MAX, zero)
    if cfg.get("xfrac"):
        t = gate("xfrac", n((batch, 2)) * XFRAC_STD, jnp.zeros((batch, 2)))
        geo["frac_shift"] = (t[:, 0] * width, t[:, 1] * height)
    return AugmentParams(
        g_inv=geometric_matrix(batch, **geo),
        brightness=u() - 0.5 if cfg.get("brightness") else zero,
        contrast=u() + 0.5 if cfg.get("contrast") else one,
        saturation=u() * 2 if cfg.get("saturation") else one,
        cutout_center=u((batch, 2)),
        cutout_size=gate("cutout", jnp.full((batch,), CUTOUT_SIZE), zero) if cfg.get("cutout") else zero,
    )


# ---------------------------------------------------------------- execution


def _fir(x: jax.Array, taps: np.ndarray, axis: int, stride: int = 1) -> jax.Array:
    """Valid correlation with static taps along `axis`, keeping every `stride`-th output.

    A sum of shifted (strided) slices: XLA fuses it into one loop, where a grouped `conv_general_dilated`
    runs ~20× slower on CPU.
    """
    n = (x.shape[axis] - len(taps)) // stride + 1
    return sum(
        float(t) * jax.lax.slice_in_dim(x, i, i + (n - 1) * stride + 1, stride=stride, axis=axis)
        for i, t in enumerate(taps)
    )


def _phase_pads(axis: int, ndim: int, even: tuple[int, int], odd: tuple[int, int]) -> tuple[list, list]:
    pe, po = [(0, 0)] * ndim, [(0, 0)] * ndim
    pe[axis], po[axis] = even, odd
    return pe, po


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """`upfirdn2d.upsample2d(x, sym6, up=2)` along one axis, polyphase.

    upfirdn2d zero-stuffs to 2N samples, pads (6, 5) and convolves with g = 2·f (gain up² split over the two
    separable passes): output 2p takes the even taps of the flipped filter over x[p−3 … p+2], output 2p+1
    the odd taps over x[p−2 … p+3]. Computing the two phases and interleaving skips the zero multiplies.
    """
    g = HZ_GEOM[::-1] * 2
    pe, po = _phase_pads(axis, x.ndim, (3, 2), (2, 3))
    even, odd = _fir(jnp.pad(x, pe), g[0::2], axis), _fir(jnp.pad(x, po), g[1::2], axis)
    shape = list(x.shape)
    shape[axis] *= 2
    return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def _upsample_axis_fwd(x: jax.Array, axis: int) -> tuple[jax.Array, None]:
    return _upsample_axis(x, axis), None


def _upsample_axis_bwd(axis: int, _: None, gy: jax.Array) -> tuple[jax.Array]:
    # The adjoint of each phase is a correlation with its reversed taps; autodiff's transpose of the slice
    # sums and the interleave is ~5× slower on CPU.
    g = HZ_GEOM[::-1] * 2
    n = gy.shape[axis] // 2
    ge = jax.lax.slice_in_dim(gy, 0, 2 * n - 1, stride=2, axis=axis)
    go = jax.lax.slice_in_dim(gy, 1, 2 * n, stride=2, axis=axis)
    pe, po = _phase_pads(axis, gy.ndim, (2, 3), (3, 2))
    return (_fir(jnp.pad(ge, pe), g[0::2][::-1], axis) + _fir(jnp.pad(go, po), g[1::2][::-1], axis),)


_upsample_axis.defvjp(_upsample_axis_fwd, _upsample_axis_bwd)


def _upsample2x(x: jax.Array) -> jax.Array:
    """`upfirdn2d.upsample2d(x, sym6, up=2)`. x: [B, H, W, K] → [B, 2H, 2W, K]."""
    return _upsample_axis(_upsample_axis(x, 2), 1)


def _downsample2x(x: jax.Array, crop: int) -> jax.Array:
    """`upfirdn2d.downsample2d(x, sym6, down=2, padding=-crop, flip_filter=True)`. [B,2H',2W',K]→[B,H'',W'',K].

    flip_filter=True makes it a correlation with f; only the kept (even) outputs are computed.
    """
    p = crop - (len(HZ_GEOM) - 1) // 2  # = crop - 5: net crop each side before the strided correlation
    x = x[:, p : x.shape[1] - p, p : x.shape[2] - p]
    return _fir(_fir(x, HZ_GEOM, 2, stride=2), HZ_GEOM, 1, stride=2)


def _bilinear_zeros(img: jax.Array, ix: jax.Array, iy: jax.Array) -> jax.Array:
    """`grid_sample(bilinear, zeros, align_corners=False)` at pixel coordinates. img [B,H,W,K], ix/iy [B,h,w]."""
    b, h, w, k = img.shape
    flat = img.reshape(b, h * w, k)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - jnp.abs(ix - xi)) * (1 - jnp.abs(iy - yi))
            ok = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32).reshape(b, -1, 1)
            v = jnp.take_along_axis(flat, idx, axis=1).reshape(b, *ix.shape[1:], k)
            out = out + v * jnp.where(ok, wgt, 0.0)[..., None]
    return out


def warp(x: jax.Array, g_inv: jax.Array) -> jax.Array:
    """ADA's geometric execution: reflect pad, 2× up, bilinear resample through `g_inv`, 2× down. x: [B,H,W,K]."""
    b, h, w, _ = x.shape
    my, mx = h - 1, w - 1  # the official margin's clamp (see module docstring)
    xp = jnp.pad(x, ((0, 0), (my, my), (mx, mx), (0, 0)), mode="reflect")
    up = _upsample2x(xp)
    hu, wu = up.shape[1:3]
    # To the upsampled pixel grid: G = T(-½) S(2) G_inv S(½) T(½) (ADA's two conjugations).
    g = translate2d(-0.5, -0.5, b) @ scale2d(2, 2, b) @ g_inv @ scale2d(0.5, 0.5, b) @ translate2d(0.5, 0.5, b)
    ho, wo = (h + HZ_PAD * 2) * 2, (w + HZ_PAD * 2) * 2
    yc, xc = jnp.meshgrid(jnp.arange(ho) + 0.5 - ho / 2, jnp.arange(wo) + 0.5 - wo / 2, indexing="ij")
    src = jnp.einsum("bij,jhw->bihw", g[:, :2], jnp.stack([xc, yc, jnp.ones_like(xc)]))
    ix, iy = src[:, 0] + (wu - 1) / 2, src[:, 1] + (hu - 1) / 2
    return _downsample2x(_bilinear_zeros(up, ix, iy), crop=HZ_PAD * 2)


def _colour_and_cutout(x: jax.Array, prm: AugmentParams, cfg: dict[str, float]) -> jax.Array:
    bshape = (-1, 1, 1, 1)
    if cfg.get("brightness"):
        x = x + prm.brightness.reshape(bshape)
    if cfg.get("contrast"):
        m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - m) * prm.contrast.reshape(bshape) + m
    if cfg.get("saturation") and x.shape[-1] > 1:
        m = jnp.mean(x, axis=-1, keepdims=True)
        x = (x - m) * prm.saturation.reshape(bshape) + m
    if cfg.get("cutout"):
        h, w = x.shape[1:3]
        cx, cy = prm.cutout_center[:, 0, None, None], prm.cutout_center[:, 1, None, None]
        half = prm.cutout_size[:, None, None] / 2
        mx = jnp.abs((jnp.arange(w)[None, None, :] + 0.5) / w - cx) >= half
        my = jnp.abs((jnp.arange(h)[None, :, None] + 0.5) / h - cy) >= half
        x = x * (mx | my).astype(x.dtype)[..., None]
    return x


def apply_params(prm: AugmentParams, x0: jax.Array, x1: jax.Array, preset: str) -> tuple[jax.Array, jax.Array]:
    """Applies the same per-example augmentation to both inputs. x0, x1: [B, H, W, C] → same shapes."""
    cfg = check_preset(preset)
    if x0.shape != x1.shape or x0.ndim != 4:
        raise ValueError(f"augment inputs must be two [B, H, W, C] arrays of one shape, got {x0.shape}, {x1.shape}")
    dtype = x0.dtype
    x0, x1 = x0.astype(jnp.float32), x1.astype(jnp.float32)
    if any(cfg.get(k) for k in _GEOMETRIC):
        # Two warps rather than one over the channel concatenation: the backward pass then only runs through
        # the differentiated input's.
        x0, x1 = warp(x0, prm.g_inv), warp(x1, prm.g_inv)
    x0, x1 = _colour_and_cutout(x0, prm, cfg), _colour_and_cutout(x1, prm, cfg)
    return x0.astype(dtype), x1.astype(dtype)


def augment_pair(
    rng: jax.Array, x0: jax.Array, x1: jax.Array, preset: str = "bgco", p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Draws one augmentation per example and applies it to both inputs. x0, x1: [B, H, W, C]."""
    b, h, w, _ = x0.shape
    return apply_params(sample_params(rng, b, h, w, preset, p), x0, x1, preset)
