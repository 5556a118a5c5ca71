"""The MNIST world's LatentLPIPS, learned the paper's way (§3.2 "Learning LatentLPIPS", Appendix B.2), written in
the official elatentlpips checkpoint format.

The paper trains a VGG16-BN on ImageNet *in SD's latent space* (4-channel first conv, first three max-pools
removed), then calibrates the five 1×1 heads on BAPPS 2AFC judgements as LPIPS does. Here the world has no ImageNet
and no human judges, so both steps are redone on the world's own data and latent space (the world VAE), with
stated substitutes:

**(a) Trunk: a classifier on VAE latents.** A LatentVGG16-BN of width multiplier `width`
(`latent_vgg.scaled_widths`; 0.25 → conv widths 16 … 128) is trained from scratch on `vae.encode_latents(image)`
(posterior mean, diffusion scaling: what the U-Net and the loss see) of the **train** split only, to predict the
digit (10 classes) and the palette colour (8 classes): two linear heads on the flattened last tap (after the last
real max-pool: 2×2×C for 8×8 latents, flattened like torchvision's VGG classifier), summed cross-entropies.
Augmentation: every sample is the digit re-coloured in a random palette colour (`data.recoloured_batch`'s idea),
with a random pixel-space affine warp (rotation ±12°, scale 0.9–1.1, shift ±2 px), stroke thickening/thinning (grey
dilation/erosion, p = 0.25), intensity 0.85–1; `pool_copies` such samples per digit are encoded once. In latent
space, per step: a random shift by up to one latent pixel (edge padding: the border is background) and Gaussian
noise of std U(0, 0.2) (latents have unit std), so the trunk also sees the slightly off-manifold latents a student
produces. AdamW (lr 1e-3: 3e-3 and SGD stalled for ~100 steps at chance on the digit task, 5e-4 learned slower),
batch 64, warm-up + cosine, BN in training mode (torch's momentum 0.1). Accuracy is reported on the **held-out**
split (its own colours, no augmentation). The heads' tensors are stored as
`model.classifier.{digit,colour}.{weight,bias}` (the loaders ignore `model.classifier.*`, as they ignore the
official ImageNet classifier).

**(b) Heads: 2AFC calibration in the spirit of BAPPS.** A triplet is a reference image and two distortions of it,
each 1–2 pixel-space operations drawn from: Gaussian blur, additive noise, sub-pixel shift, elastic warp, affine
(rotate/scale), colour-channel gains, brightness, stroke thickening/thinning, JPEG, and VAE re-encoding with latent
noise (always applied last); strengths random; all images stored as uint8 like real ones. All three are encoded
with the VAE. **Judge**: which distortion is closer to the reference by SSIM (Wang et al. 2004; RGB in [0, 1],
Gaussian window σ = 1.5, C1 = 0.01², C2 = 0.03², mean over pixels and channels); ties count ½. BAPPS used humans;
none exist here and pixel LPIPS has no trained weights in this project, so the judge is the standard full-reference
structural metric, which is computed in pixel space (independent of the VAE and of every latent metric compared)
and is not a monotone function of pixel or latent L2 (it weighs structure, contrast and local means), so agreement
with it is earned, not built in. Heads: LPIPS' protocol with the trunk frozen — non-negative weights (projected:
clamped at 0 after every step, LPIPS' `clamp_weights`), LPIPS' `BCERankingLoss` (its small `Dist2LogitLayer` net
on d0, d1, d0 − d1, d0/(d1 + 0.1), d1/(d0 + 0.1), binary cross-entropy against the judge; the net is discarded),
Adam (β1 0.5, as LPIPS), LPIPS' initialisation (PyTorch's default conv init, clamped); no dropout (the per-channel
spatial means of the squared feature differences are precomputed once, which makes calibration seconds instead of
minutes; the distance is linear in them). Calibration triplets use **train**-split digits (random colours) only;
the reported 2AFC agreement uses a **held-out 2AFC split** built the same way from the held-out digits (their own
colours, two triplets per digit; nothing is fitted on it), for: the calibrated LatentLPIPS (as saved and
reloaded), the same trunk with unit heads (LPIPS' "lin" off baseline), latent L2 (MSE), and, for reference, pixel
L2 and the calibrated LatentLPIPS plus the loss's L1 term.

**(c) Files** (`save_checkpoints`), the official layout, written with `torch.save` (the project only *reads* torch
pickles, `models/torch_pickle.py`; torch is present wherever the world is built):
`{name}_latent_vgg16.pth.tar` = `{'epoch', 'arch', 'state_dict': {'model.features.{i}.*', 'model.classifier.*'},
'best_acc1', 'latent_space'}` and `{name}_latest_vgg16_tuned.pth` = the `ELatentLPIPS` state dict
(`net.slice{k}.{i}.*` with BN `num_batches_tracked`, `lin{k}.model.1.weight`, `lins.{k}.model.1.weight`).
`latent_space` = `{name, channels, scale, shift, vae_sha256}` lets `load_latent_lpips(dir, name)` register the name
(`elatentlpips.register_encoder`) with the VAE's scaling factor. Tensors are stored as float16 by default (the
trunk is rounded to float16 *before* calibration and the reported numbers come from the reloaded files, so what
ships is what was measured); both our reader and the official package (its strict `load_state_dict` copies into
float32 modules) accept float16. The official package itself only loads full-width files under its five names
(torchvision's fixed widths and ImageNet classifier), so a narrow world file is for our loader only.

`train_latent_lpips(out_dir, splits, vae_dir, seed=..., width=..., steps_trunk=..., steps_heads=...)` runs all of
it, writes `out_dir` (new or empty; written under a temporary name, then renamed) with the two files and
`{name}_metrics.json`, and returns the metrics. It is a pure function of its arguments (NumPy and JAX PRNGs
seeded from `seed`, XLA:CPU is deterministic).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.flatten_util import ravel_pytree
from scipy import ndimage

from d2g_jax.losses.elatentlpips import LATENT_SPACE_KEY, checkpoint_files, load_latent_lpips
from d2g_jax.losses.latent_vgg import (
    LATENT_REMOVED_POOLS,
    LATENT_TAPS,
    PerceptualNet,
    VGGTrunk,
    conv_indices,
    scaled_widths,
    tap_channels,
)
from d2g_jax.models.convert import flax_to_torch
from d2g_jax.models.vae import load_vae
from d2g_jax.world import train_util as tu
from d2g_jax.world.data import COLOURS, PALETTE, SIDE, Split, colourise

DEFAULT_NAME = "mnist_world"
DEFAULT_WIDTH = 0.25
SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))  # elatentlpips' CalibratedLatentVGG16BN slices
N_DIGITS = 10
DISTORTIONS = ("blur", "noise", "shift", "elastic", "affine", "colour", "brightness", "stroke", "jpeg", "vae")
SSIM_SIGMA, SSIM_C1, SSIM_C2 = 1.5, 0.01**2, 0.03**2
_PALETTE = np.asarray([PALETTE[c] for c in COLOURS], np.float32) / 255.0  # [8, 3]


# ------------------------------------------------------------------------------------------------------------
# Pixel-space augmentation (trunk) and distortions (2AFC). Images are float32 in [0, 1].


def _warp(img: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Affine resampling of one [H, W] or [H, W, C] image (output coord → input coord, bilinear, zero outside)."""
    if img.ndim == 2:
        return ndimage.affine_transform(img, matrix, offset, order=1, mode="constant")
    return np.stack([_warp(img[..., c], matrix, offset) for c in range(img.shape[-1])], -1)


def _random_affine(rng: np.random.Generator, rot_deg: float, scale: tuple[float, float], shift: float):
    a = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    s = rng.uniform(*scale)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / s
    c = (SIDE - 1) / 2.0
    t = rng.uniform(-shift, shift, 2)
    return m, np.array([c, c]) - m @ np.array([c, c]) - t


def _stroke(img: np.ndarray, thicken: bool, size: int) -> np.ndarray:
    fp = np.ones((size, size) + (1,) * (img.ndim - 2), bool)
    return ndimage.grey_dilation(img, footprint=fp) if thicken else ndimage.grey_erosion(img, footprint=fp)


def trunk_samples(split: Split, copies: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`copies` augmented, randomly re-coloured versions of every digit of `split`:
    (uint8 images [copies·N, 32, 32, 3], digits, colours)."""
    n = len(split)
    pad = (SIDE - split.gray.shape[1]) // 2
    images = np.empty((copies * n, SIDE, SIDE, 3), np.uint8)
    digits = np.tile(split.digits, copies)
    colours = rng.integers(0, len(COLOURS), copies * n)
    for j in range(copies * n):
        g = np.pad(split.gray[j % n].astype(np.float32) / 255.0, pad)
        g = _warp(g, *_random_affine(rng, 12.0, (0.9, 1.1), 2.0))
        if rng.random() < 0.25:
            g = _stroke(g, bool(rng.random() < 0.5), 2)
        g = np.clip(g, 0.0, 1.0) * rng.uniform(0.85, 1.0)
        images[j] = np.round(g[..., None] * _PALETTE[colours[j]] * 255.0).astype(np.uint8)
    return images, digits, colours


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


def _elastic(img: np.ndarray, rng: np.random.Generator, alpha: float) -> np.ndarray:
    h, w = img.shape[:2]
    d = [ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), 3.0, mode="constant") for _ in range(2)]
    d = [x * alpha / max(1e-6, float(np.abs(x).max())) for x in d]  # max displacement `alpha` px
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [yy + d[0], xx + d[1]]
    return np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode="constant") for c in range(3)], -1)


def distort(img: np.ndarray, op: str, rng: np.random.Generator) -> np.ndarray:
    """One pixel-space distortion of a float image [32, 32, 3] in [0, 1] with a random strength ('vae' excluded:
    it needs the VAE and is batched by `make_2afc`)."""
    if op == "blur":
        out = ndimage.gaussian_filter(img, (rng.uniform(0.4, 1.5),) * 2 + (0,))
    elif op == "noise":
        out = img + rng.normal(0.0, rng.uniform(0.02, 0.12), img.shape)
    elif op == "shift":
        out = ndimage.shift(img, (*rng.uniform(-1.5, 1.5, 2), 0), order=1, mode="constant")
    elif op == "elastic":
        out = _elastic(img, rng, rng.uniform(0.6, 2.0))
    elif op == "affine":
        out = _warp(img, *_random_affine(rng, 12.0, (0.9, 1.1), 0.0))
    elif op == "colour":
        out = img * np.exp(rng.normal(0.0, rng.uniform(0.1, 0.35), 3))
    elif op == "brightness":
        out = img * rng.uniform(0.6, 1.25)
    elif op == "stroke":
        out = _stroke(img, bool(rng.random() < 0.5), int(rng.choice([2, 3])))
    elif op == "jpeg":
        out = _jpeg(img, int(rng.integers(15, 71)))
    else:
        raise ValueError(f"unknown distortion {op!r}; choose one of {DISTORTIONS}")
    return np.clip(out, 0.0, 1.0)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM per image of two float batches [N, H, W, C] in [0, 1] (Gaussian window σ 1.5, per channel)."""
    f = lambda x: ndimage.gaussian_filter(x, (0, SSIM_SIGMA, SSIM_SIGMA, 0), mode="reflect", truncate=3.5)  # noqa: E731
    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma * ma, f(b * b) - mb * mb, f(a * b) - ma * mb
    s = ((2 * ma * mb + SSIM_C1) * (2 * cov + SSIM_C2)) / ((ma * ma + mb * mb + SSIM_C1) * (va + vb + SSIM_C2))
    return s.mean(axis=(1, 2, 3))


def _batched(fn, *xs: np.ndarray, batch: int = 250) -> np.ndarray:
    """`fn(*chunks)` over the rows of `xs` in chunks of exactly `batch` rows (the last zero-padded, so a jitted `fn`
    compiles once for every call), concatenated and cut to the row count."""
    n = len(xs[0])
    outs = []
    for i in range(0, n, batch):
        chunks = [x[i : i + batch] for x in xs]
        pad = batch - len(chunks[0])
        if pad:
            chunks = [np.concatenate([c, np.zeros((pad, *c.shape[1:]), c.dtype)]) for c in chunks]
        outs.append(jax.tree.map(np.asarray, fn(*chunks)))
    return jax.tree.map(lambda *a: np.concatenate(a)[:n], *outs)


def _to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1] (the VAE's image range)."""
    return images.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------------
# The VAE side: encode / re-encode (diffusion latents, as the U-Net and the loss see them).


class _VAE:
    def __init__(self, vae_dir: str):
        self.module, self.vars = load_vae(vae_dir)
        self.config = self.module.config
        self._enc = jax.jit(lambda v, x: self.module.apply(v, x, method="encode_latents"))
        self._dec = jax.jit(lambda v, z: self.module.apply(v, z, method="decode_latents"))

    def encode(self, images: np.ndarray, batch: int = 250) -> np.ndarray:
        """uint8 [N, 32, 32, 3] → diffusion latents float32 [N, h, w, C] (posterior mean)."""
        return _batched(lambda x: self._enc(self.vars, _to_unit(x)), images, batch=batch)

    def reencode(self, images: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float [N, 32, 32, 3] in [0, 1] → decode(encode(x) + noise · ε) in [0, 1], ε ~ N(0, 1) from `rng`."""
        z = _batched(lambda x: self._enc(self.vars, x * 2.0 - 1.0), images.astype(np.float32))
        z = z + noise[:, None, None, None] * rng.standard_normal(z.shape).astype(np.float32)
        return np.clip((_batched(lambda x: self._dec(self.vars, x), z) + 1.0) / 2.0, 0.0, 1.0)


def vae_fingerprint(vae_dir: str) -> str:
    """sha256 over the VAE folder's config and weight files (names the latent space a LatentLPIPS belongs to)."""
    folder = os.path.join(vae_dir, "vae") if os.path.isdir(os.path.join(vae_dir, "vae")) else vae_dir
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith(".safetensors") or name.endswith(".index.json"):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# 2AFC triplets.


def make_2afc(
    refs: np.ndarray,
    rng: np.random.Generator,
    vae: _VAE,
    *,
    vae_noise: float = 0.4,
    distortions: Sequence[str] = DISTORTIONS,
) -> dict[str, np.ndarray]:
    """Triplets for reference images uint8 [N, 32, 32, 3]: two independent distortions each (1–2 ops from
    `distortions`, 'vae' last). Returns uint8 `ref`, `d0`, `d1`, the judge's `h` (1: d1 closer by SSIM, 0: d0,
    ½: tie) and the op names `ops0`, `ops1` (e.g. 'blur+vae')."""
    bad = [d for d in distortions if d not in DISTORTIONS]
    if bad or len(distortions) < 2:
        raise ValueError(f"distortions {list(distortions)}: choose at least two of {DISTORTIONS}")
    n = len(refs)
    ref_f = refs.astype(np.float32) / 255.0
    out: dict[str, Any] = {"ref": refs}
    for side in ("d0", "d1"):
        imgs = np.empty_like(ref_f)
        names, vae_rows = [], []
        for i in range(n):
            k = 1 if rng.random() < 0.6 else 2
            ops = [distortions[j] for j in rng.choice(len(distortions), k, replace=False)]
            ops = sorted(ops, key=lambda o: o == "vae")  # 'vae' last
            x = ref_f[i]
            for op in ops:
                if op != "vae":
                    x = distort(x, op, rng)
            imgs[i] = x
            if ops[-1] == "vae":
                vae_rows.append(i)
            names.append("+".join(ops))
        if vae_rows:
            rows = np.asarray(vae_rows)
            noise = rng.uniform(0.0, vae_noise, len(rows)).astype(np.float32)
            imgs[rows] = vae.reencode(imgs[rows], noise, rng)
        out[side] = np.round(imgs * 255.0).astype(np.uint8)
        out["ops" + side[1]] = np.asarray(names)
    s0 = ssim(ref_f, out["d0"].astype(np.float32) / 255.0)
    s1 = ssim(ref_f, out["d1"].astype(np.float32) / 255.0)
    out["h"] = np.where(s1 > s0, 1.0, np.where(s1 < s0, 0.0, 0.5)).astype(np.float32)
    out["ssim0"], out["ssim1"] = s0.astype(np.float32), s1.astype(np.float32)
    return out


def agreement(m0: np.ndarray, m1: np.ndarray, h: np.ndarray) -> float:
    """BAPPS' 2AFC score: a metric that finds d1 closer (m1 < m0) scores h, d0 closer scores 1 − h, a tie ½."""
    m0, m1, h = (np.asarray(x, np.float64) for x in (m0, m1, h))
    return float(np.mean(np.where(m1 < m0, h, np.where(m0 < m1, 1.0 - h, 0.5))))


# ------------------------------------------------------------------------------------------------------------
# (a) The trunk as a classifier.


class LatentClassifier(nn.Module):
    """LatentVGG16-BN trunk (`net`, named as `PerceptualNet.net`) + linear digit and colour heads on the flattened
    last tap (2×2 for 8×8 latents)."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        taps = VGGTrunk(True, LATENT_REMOVED_POOLS, LATENT_TAPS, widths=self.widths, name="net")(z, train=train)
        h = taps[-1].reshape(z.shape[0], -1)  # flattened, as VGG's classifier takes its last map
        return nn.Dense(N_DIGITS, name="digit")(h), nn.Dense(len(COLOURS), name="colour")(h)


def _latent_augment(key: jax.Array, z: jax.Array) -> jax.Array:
    """Per example: a shift by −1…1 latent pixels (edge padding) and Gaussian noise of std U(0, 0.2)."""
    b, h, w, _ = z.shape
    k1, k2, k3 = jax.random.split(key, 3)
    shifts = jax.random.randint(k1, (b, 2), 0, 3)
    zp = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    z = jax.vmap(lambda x, s: jax.lax.dynamic_slice(x, (s[0], s[1], 0), (h, w, x.shape[-1])))(zp, shifts)
    std = jax.random.uniform(k2, (b, 1, 1, 1), maxval=0.2)
    return z + std * jax.random.normal(k3, z.shape)


def _round16(tree: Any) -> Any:
    """Rounds float leaves through float16 (the stored precision), keeping float32."""
    return jax.tree.map(lambda x: np.asarray(np.asarray(x, np.float16), np.float32), jax.device_get(tree))


def train_trunk(
    latents: np.ndarray,
    digits: np.ndarray,
    colours: np.ndarray,
    *,
    widths: tuple[int, ...],
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    log: tu.Log,
) -> tuple[dict, dict]:
    """Trains `LatentClassifier` on the latent pool; returns (variables, {'seconds', 'final_loss', ...})."""
    model = LatentClassifier(widths)
    z0 = jnp.zeros((1, *latents.shape[1:]), jnp.float32)
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(seed), z0))
    # Parameters and Adam moments as one flat vector: a handful of optimiser ops instead of a few per tensor
    # (XLA:CPU compile time; the train_util trainers do the same).
    params, unravel = ravel_pytree(variables["params"])
    stats = variables["batch_stats"]
    opt, schedule = tu.adamw(lr, steps, warmup=max(1, steps // 20), weight_decay=5e-4)
    opt_state = jax.jit(opt.init)(params)

    def loss_fn(p, s, z, yd, yc):
        v = {"params": unravel(p), "batch_stats": s}
        (ld, lc), upd = model.apply(v, z, train=True, mutable=["batch_stats"])
        ce_d = optax.softmax_cross_entropy_with_integer_labels(ld, yd).mean()
        ce_c = optax.softmax_cross_entropy_with_integer_labels(lc, yc).mean()
        acc = jnp.mean(jnp.argmax(ld, -1) == yd)
        return ce_d + ce_c, (upd["batch_stats"], {"ce_digit": ce_d, "ce_colour": ce_c, "acc_digit": acc})

    @jax.jit
    def step_fn(p, s, o, z, yd, yc, key):
        z = _latent_augment(key, z)
        (loss, (s, m)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, z, yd, yc)
        updates, o = opt.update(g, o, p)
        return p + updates, s, o, dict(m, loss=loss)

    rows = tu.epoch_rows(len(latents), batch_size, np.random.default_rng([seed, 2]))
    key = jax.random.key(seed + 1)
    progress = tu.Progress("latent_lpips trunk", steps, log, every=max(1, steps // 10))
    m: dict[str, Any] = {}
    for step in range(steps):
        r = next(rows)
        params, stats, opt_state, m = step_fn(params, stats, opt_state, latents[r], digits[r], colours[r],
                                              jax.random.fold_in(key, step))  # fmt: skip
        progress(step, **{k: float(v) for k, v in m.items()}, lr=float(schedule(step)))
    info = {"seconds": progress.seconds, "final_loss": float(m.get("loss", np.nan)), "steps": steps,
            "batch_size": batch_size, "lr": lr}  # fmt: skip
    return {"params": jax.device_get(unravel(params)), "batch_stats": jax.device_get(stats)}, info


def classifier_accuracy(variables: dict, widths: tuple[int, ...], latents: np.ndarray, digits, colours) -> dict:
    model = LatentClassifier(widths)
    fn = jax.jit(lambda v, z: model.apply(v, z))
    ld, lc = _batched(lambda z: fn(variables, z), latents)
    pd, pc = ld.argmax(-1), lc.argmax(-1)
    return {"digit": float(np.mean(pd == digits)), "colour": float(np.mean(pc == colours)),
            "joint": float(np.mean((pd == digits) & (pc == colours)))}  # fmt: skip


def classifier_tensors(variables: dict, final_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """The classifier heads in PyTorch layout, `{'digit.weight': [10, C·h·w], 'digit.bias', 'colour.*'}`, the
    flattened input in NCHW order as torchvision's VGG flattens its last map; `final_hw` = the last tap's (h, w)."""
    out = {}
    for head in ("digit", "colour"):
        t = flax_to_torch(variables["params"][head])
        w = t["weight"]  # [out, h·w·C]: NHWC flatten order
        out[f"{head}.weight"] = w.reshape(w.shape[0], *final_hw, -1).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
        out[f"{head}.bias"] = t["bias"]
    return out


# ------------------------------------------------------------------------------------------------------------
# (b) The heads.


def perceptual_variables(trunk_vars: dict, heads: Sequence[np.ndarray]) -> dict:
    """`PerceptualNet` variables from the classifier's trunk and five head vectors (`[C_k]` each)."""
    params = {"net": trunk_vars["params"]["net"]}
    for k, w in enumerate(heads):
        params[f"lin{k}"] = {"model_1": {"kernel": np.asarray(w, np.float32).reshape(1, 1, -1, 1)}}
    return {"params": params, "batch_stats": {"net": trunk_vars["batch_stats"]["net"]}}


def heads_of(variables: dict) -> list[np.ndarray]:
    return [np.asarray(variables["params"][f"lin{k}"]["model_1"]["kernel"]).reshape(-1) for k in range(5)]


@functools.lru_cache(maxsize=8)
def pair_features(module: PerceptualNet):
    """`(variables, za, zb) → [B, ΣC_k]` (jitted, in padded chunks; one compiled function per module): per layer and
    channel, the spatial mean of the squared difference of the unit-normalised taps. The LatentLPIPS distance is
    this times the concatenated head weights."""

    def f(v, za, zb):
        fa = module.apply(v, za, method=PerceptualNet.features)
        fb = module.apply(v, zb, method=PerceptualNet.features)
        return jnp.concatenate([jnp.mean((a - b) ** 2, axis=(1, 2)) for a, b in zip(fa, fb)], axis=-1)

    jf = jax.jit(f)
    return lambda v, za, zb: _batched(lambda a, b: jf(v, a, b), za, zb)


class Dist2Logit(nn.Module):
    """LPIPS' `Dist2LogitLayer` (chn_mid 32): distances (d0, d1) → the logit of P(d1 is closer), as LPIPS."""

    @nn.compact
    def __call__(self, d0: jax.Array, d1: jax.Array, eps: float = 0.1) -> jax.Array:
        x = jnp.stack([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], axis=-1)
        x = nn.leaky_relu(nn.Dense(32)(x), 0.2)
        x = nn.leaky_relu(nn.Dense(32)(x), 0.2)
        return nn.Dense(1)(x)[..., 0]  # a logit; the sigmoid is inside the BCE


def calibrate_heads(
    feats0: np.ndarray, feats1: np.ndarray, h: np.ndarray, chans: Sequence[int], *, steps: int, seed: int,
    lr: float = 1e-3, batch_size: int = 256, log: tu.Log = print,
) -> tuple[list[np.ndarray], dict]:  # fmt: skip
    """LPIPS' calibration on precomputed pair features: non-negative heads `w` (clamped after every Adam step),
    `BCE(Dist2Logit(f0·w, f1·w), h)`; lr constant for the first half, then linearly to 0 (LPIPS' schedule)."""
    rng = np.random.default_rng([seed, 3])
    # PyTorch's default Conv2d init (kaiming_uniform, a=√5: U(±1/√fan_in)), then LPIPS' clamp at 0.
    w0 = np.concatenate([rng.uniform(-1, 1, c) / np.sqrt(c) for c in chans]).astype(np.float32)
    d2l = Dist2Logit()
    d2l_params = jax.jit(d2l.init)(jax.random.key(seed + 3), jnp.ones(1), jnp.ones(1))["params"]
    params = {"w": jnp.maximum(jnp.asarray(w0), 0.0), "d2l": d2l_params}
    half = max(1, steps // 2)
    sched = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, steps - half)], [half])
    opt = optax.adam(sched, b1=0.5, b2=0.999)
    opt_state = jax.jit(opt.init)(params)

    def loss_fn(p, f0, f1, y):
        logit = d2l.apply({"params": p["d2l"]}, f0 @ p["w"], f1 @ p["w"])
        return optax.sigmoid_binary_cross_entropy(logit, y).mean()

    @jax.jit
    def step_fn(p, o, f0, f1, y):
        loss, g = jax.value_and_grad(loss_fn)(p, f0, f1, y)
        u, o = opt.update(g, o, p)
        p = optax.apply_updates(p, u)
        return dict(p, w=jnp.maximum(p["w"], 0.0)), o, loss

    bs = min(batch_size, len(h))
    rows = tu.epoch_rows(len(h), bs, rng)
    progress = tu.Progress("latent_lpips heads", steps, log, every=max(1, steps // 5))
    loss = jnp.nan
    for step in range(steps):
        r = next(rows)
        params, opt_state, loss = step_fn(params, opt_state, feats0[r], feats1[r], h[r])
        progress(step, bce=float(loss))
    w = np.asarray(params["w"])
    splits = np.cumsum(chans)[:-1]
    return list(np.split(w, splits)), {"final_bce": float(loss), "steps": steps, "lr": lr, "batch_size": bs}


# ------------------------------------------------------------------------------------------------------------
# (c) Files.


def _to_torch(a: Any, dtype: Any = None):
    """numpy → torch tensor, float arrays cast to `dtype`; a broadcast array (a stride of 0, e.g. a placeholder
    classifier of the official shapes) stays a broadcast tensor (one stored element per broadcast axis)."""
    import torch

    a = np.asarray(a)
    expand = a.size and 0 in a.strides
    small = a[tuple(slice(0, 1) if s == 0 else slice(None) for s in a.strides)] if expand else a
    if dtype is not None and np.issubdtype(small.dtype, np.floating):
        small = small.astype(dtype)
    t = torch.from_numpy(np.ascontiguousarray(small))
    return t.expand(a.shape) if expand else t


def save_checkpoints(
    out_dir: str,
    name: str,
    variables: dict,
    *,
    classifier: Mapping[str, np.ndarray],
    latent_space: Mapping[str, Any] | None,
    best_acc1: float,
    epoch: int,
    num_batches_tracked: int,
    dtype: Any = np.float16,
) -> tuple[str, str]:
    """Writes `{name}_latent_vgg16.pth.tar` and `{name}_latest_vgg16_tuned.pth` (official layout, module
    docstring) from `PerceptualNet` variables (any width); `classifier`: `{suffix: array}` stored as
    `model.classifier.{suffix}`. Float tensors are stored as `dtype`. Returns the two paths."""
    import collections

    import torch

    trunk_path, tuned_path = checkpoint_files(out_dir, name)
    net = flax_to_torch({"net": variables["params"]["net"]})
    net.update(flax_to_torch({"net": variables["batch_stats"]["net"]}))
    bn = set(conv_indices(True))
    bn = {i + 1 for i in bn}  # each conv's BN follows it
    features = collections.OrderedDict()
    for key in sorted(net, key=lambda k: (int(k.split(".")[2]), k)):
        features[key[len("net.features.") :]] = _to_torch(net[key], dtype)
    for i in sorted(bn):
        features[f"{i}.num_batches_tracked"] = torch.tensor(int(num_batches_tracked))
    features = collections.OrderedDict(sorted(features.items(), key=lambda kv: (int(kv[0].split(".")[0]), kv[0])))

    state = collections.OrderedDict((f"model.features.{k}", v) for k, v in features.items())
    for k, v in classifier.items():
        state[f"model.classifier.{k}"] = _to_torch(v, dtype)
    trunk_obj = {"epoch": int(epoch), "arch": "latent_vgg16_bn", "state_dict": state, "best_acc1": float(best_acc1)}
    if latent_space is not None:
        trunk_obj[LATENT_SPACE_KEY] = {k: (v if v is None or isinstance(v, (str, int)) else float(v))
                                       for k, v in latent_space.items()}  # fmt: skip

    tuned = collections.OrderedDict()
    for k, v in features.items():
        i = int(k.split(".")[0])
        s = next(n for n, (a, b) in enumerate(SLICES, 1) if a <= i < b)
        tuned[f"net.slice{s}.{k}"] = v
    heads = [_to_torch(np.asarray(w, np.float32).reshape(1, -1, 1, 1), dtype) for w in heads_of(variables)]
    for k, w in enumerate(heads):
        tuned[f"lin{k}.model.1.weight"] = w
    for k, w in enumerate(heads):
        tuned[f"lins.{k}.model.1.weight"] = w  # nn.ModuleList alias, same storage
    os.makedirs(out_dir, exist_ok=True)
    torch.save(trunk_obj, trunk_path)
    torch.save(tuned, tuned_path)
    return trunk_path, tuned_path


# ------------------------------------------------------------------------------------------------------------
# Everything.


def train_latent_lpips(
    out_dir: str,
    splits: Mapping[str, Split],
    vae_dir: str,
    *,
    seed: int = 0,
    width: float | Sequence[int] = DEFAULT_WIDTH,
    steps_trunk: int = 600,
    steps_heads: int = 3000,
    log: tu.Log = print,
    name: str = DEFAULT_NAME,
    batch_size: int = 64,
    lr: float = 1e-3,
    pool_copies: int = 3,
    n_2afc: int = 3000,
    heldout_2afc_per_digit: int = 2,
    storage_dtype: Any = np.float16,
    distortions: Sequence[str] = DISTORTIONS,
) -> dict[str, Any]:
    """Trains the world's LatentLPIPS (module docstring) and writes `out_dir` (new or empty).

    Args:
      out_dir: the folder to write `{name}_latent_vgg16.pth.tar`, `{name}_latest_vgg16_tuned.pth` and
        `{name}_metrics.json` into; `load_latent_lpips(out_dir, name)` reads it.
      splits: `data.world_splits(seed)` ({"train", "heldout"}).
      vae_dir: the world VAE (a diffusers `vae/` folder, or a pipeline folder holding `vae/`).
      seed: everything random derives from it.
      width: trunk width multiplier (or 13 conv widths), `latent_vgg.scaled_widths`.
      steps_trunk, steps_heads: optimisation steps of the classifier and of the head calibration.
      name: the latent space's name (`config.loss.encoder`).
      batch_size, lr, pool_copies: trunk training (augmented copies of each train digit encoded once).
      n_2afc: calibration triplets (train digits, cycled); heldout_2afc_per_digit: triplets per held-out digit.
      storage_dtype: float dtype of the stored tensors (float16 keeps a width-¼ pair of files under 4 MB).
      distortions: the 2AFC distortion kinds (default all of `DISTORTIONS`).

    Returns:
      metrics: widths, trunk accuracy (held-out digit / colour / both), 2AFC agreement (held-out and
      calibration sets) for the calibrated heads, unit heads, latent MSE, pixel MSE and calibrated + L1,
      per-distortion breakdown, file sizes and seconds per phase.
    """
    t_start = time.perf_counter()
    tu.check_target(out_dir)
    if steps_trunk < 1 or steps_heads < 1:
        raise ValueError(f"train_latent_lpips: steps_trunk ({steps_trunk}) and steps_heads ({steps_heads}) must be "
                         "positive.")  # fmt: skip
    checkpoint_files(out_dir, name)  # validates the name before any work
    widths = scaled_widths(width)
    chans = tap_channels(widths)
    train, held = splits["train"], splits["heldout"]
    vae = _VAE(vae_dir)
    cfg = vae.config
    latent_space = {"name": name, "channels": int(cfg.latent_channels),
                    "scale": None if cfg.latents_mean is not None else float(cfg.scaling_factor),
                    "shift": float(cfg.shift_factor or 0.0), "vae_sha256": vae_fingerprint(vae_dir)}  # fmt: skip
    log(f"latent_lpips: '{name}', widths {widths} (taps {chans}), VAE {vae_dir} "
        f"(scale {cfg.scaling_factor:.5f}), seed {seed}")  # fmt: skip
    metrics: dict[str, Any] = {"name": name, "widths": list(widths), "seed": seed, "latent_space": latent_space,
                               "width": float(width) if isinstance(width, (int, float)) else None}  # fmt: skip

    # (a) trunk.
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 1])
    images, digits, colours = trunk_samples(train, pool_copies, rng)
    latents = vae.encode(images)
    held_lat = vae.encode(held.images)
    log(f"latent_lpips: {len(latents)} augmented train latents {latents.shape[1:]} (std {latents.std():.3f}) in "
        f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    t_data = time.perf_counter() - t0
    trunk_vars, trunk_info = train_trunk(latents, digits, colours, widths=widths, steps=steps_trunk,
                                         batch_size=batch_size, seed=seed, lr=lr, log=log)  # fmt: skip
    trunk_vars = _round16(trunk_vars) if np.dtype(storage_dtype) == np.float16 else trunk_vars
    acc = classifier_accuracy(trunk_vars, widths, held_lat, held.digits, held.colours)
    sub = np.arange(0, len(train), max(1, len(train) // 500))  # every class (the split is ordered by class)
    acc_train = classifier_accuracy(trunk_vars, widths, vae.encode(train.images[sub]), train.digits[sub],
                                    train.colours[sub])  # fmt: skip
    log(f"latent_lpips trunk: held-out accuracy digit {acc['digit']:.4f} colour {acc['colour']:.4f} both "
        f"{acc['joint']:.4f} (train digits {acc_train['digit']:.4f})")  # fmt: skip
    metrics["trunk"] = dict(trunk_info, heldout_accuracy=acc, train_accuracy=acc_train, pool=len(latents),
                            data_seconds=t_data)  # fmt: skip

    # (b) 2AFC sets and heads.
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 4])
    refs = reference_images(train, n_2afc, rng)
    cal = make_2afc(refs, rng, vae, distortions=distortions)
    held_refs = np.concatenate([held.images] * heldout_2afc_per_digit)
    ev = make_2afc(held_refs, np.random.default_rng([seed, 5]), vae, distortions=distortions)
    for s in (cal, ev):
        s.update({f"z_{k}": vae.encode(s[k]) for k in ("ref", "d0", "d1")})
    t_2afc = time.perf_counter() - t0
    module = PerceptualNet(in_channels=int(cfg.latent_channels), latent=True, widths=widths)
    feats = pair_features(module)
    unit = perceptual_variables(trunk_vars, [np.ones(c, np.float32) for c in chans])
    for s in (cal, ev):
        s["f0"], s["f1"] = feats(unit, s["z_ref"], s["z_d0"]), feats(unit, s["z_ref"], s["z_d1"])
    log(f"latent_lpips: 2AFC triplets {len(cal['h'])} calibration (train digits) + {len(ev['h'])} held-out, "
        f"judge SSIM (d1 closer in {cal['h'].mean():.3f} / {ev['h'].mean():.3f}), "
        f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    heads, head_info = calibrate_heads(cal["f0"], cal["f1"], cal["h"], chans, steps=steps_heads, seed=seed, log=log)
    heads = [np.asarray(np.asarray(w, storage_dtype), np.float32) for w in heads]

    # (c) files, then everything reported from the reloaded files.
    tmp = tu.fresh_folder(out_dir)
    cls = classifier_tensors(trunk_vars, (latents.shape[1] // 4, latents.shape[2] // 4))
    paths = save_checkpoints(tmp, name, perceptual_variables(trunk_vars, heads), classifier=cls,
                             latent_space=latent_space, best_acc1=100.0 * acc["digit"], epoch=steps_trunk,
                             num_batches_tracked=steps_trunk, dtype=storage_dtype)  # fmt: skip
    _, loaded = load_latent_lpips(tmp, name)
    lw = np.concatenate(heads_of(loaded))
    ones = np.ones_like(lw)
    # The pair features depend on the trunk alone; they are recomputed only if the reloaded trunk is not bit-for-bit
    # the one calibrated on (it is, as the trunk was rounded to the stored dtype first).
    trunk_of = lambda v: jax.tree.leaves((v["params"]["net"], v["batch_stats"]["net"]))  # noqa: E731
    same = all(np.array_equal(a, b) for a, b in zip(trunk_of(loaded), trunk_of(unit)))
    report: dict[str, Any] = {"reloaded_trunk_identical": bool(same)}
    for split_name, s in (("heldout", ev), ("calibration", cal)):
        if same:
            f0, f1 = s["f0"], s["f1"]
        else:
            f0, f1 = feats(loaded, s["z_ref"], s["z_d0"]), feats(loaded, s["z_ref"], s["z_d1"])
        l1_0 = np.abs(s["z_ref"] - s["z_d0"]).mean(axis=(1, 2, 3))
        l1_1 = np.abs(s["z_ref"] - s["z_d1"]).mean(axis=(1, 2, 3))
        px0, px1 = (
            np.mean((s["ref"].astype(np.float32) - s[d].astype(np.float32)) ** 2, (1, 2, 3)) for d in ("d0", "d1")
        )
        rows = {
            "calibrated": (f0 @ lw, f1 @ lw),
            "unit_heads": (f0 @ ones, f1 @ ones),
            "latent_mse": tuple(np.mean((s["z_ref"] - s[f"z_{d}"]) ** 2, (1, 2, 3)) for d in ("d0", "d1")),
            "pixel_mse": (px0, px1),
            "calibrated_plus_l1": (f0 @ lw + l1_0, f1 @ lw + l1_1),
        }
        report[split_name] = {k: agreement(a, b, s["h"]) for k, (a, b) in rows.items()}
        report[split_name]["n"] = int(len(s["h"]))
        if split_name == "heldout":
            by = {}
            for op in distortions:  # triplets where either side uses `op`
                m = np.asarray([op in a.split("+") or op in b.split("+") for a, b in zip(s["ops0"], s["ops1"])])
                by[op] = {k: agreement(a[m], b[m], s["h"][m]) for k, (a, b) in rows.items() if k != "pixel_mse"}
                by[op]["n"] = int(m.sum())
            report["heldout_by_distortion"] = by
            report["heldout_distance_mean"] = {"calibrated": float(np.mean(f0 @ lw)), "unit_heads":
                                               float(np.mean(f0 @ ones)), "l1": float(np.mean(l1_0))}  # fmt: skip
    metrics["2afc"] = dict(report, judge="SSIM (Gaussian σ=1.5, RGB [0,1], C1=0.01², C2=0.03²)",
                           heads=head_info, heads_nonneg=bool(lw.min() >= 0), seconds=t_2afc)  # fmt: skip
    h = report["heldout"]
    log(f"latent_lpips 2AFC held-out (n={h['n']}): calibrated {h['calibrated']:.4f}, unit heads "
        f"{h['unit_heads']:.4f}, latent MSE {h['latent_mse']:.4f} (pixel MSE {h['pixel_mse']:.4f}, "
        f"calibrated+L1 {h['calibrated_plus_l1']:.4f})")  # fmt: skip
    sizes = {os.path.basename(p): os.path.getsize(p) for p in paths}
    metrics["files"] = sizes
    metrics["bytes"] = int(sum(sizes.values()))
    metrics["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(tmp, f"{name}_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    tu.publish_folder(tmp, out_dir)
    log(f"latent_lpips: wrote {out_dir} ({metrics['bytes'] / 1e6:.2f} MB) in {metrics['seconds']:.0f}s")
    return metrics


def reference_images(split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` 2AFC reference images: the split's digits in order (cycled), each re-coloured in a random palette
    colour (`data.colourise`), otherwise as they are. uint8 [n, 32, 32, 3]."""
    rows = np.arange(n) % len(split)
    return colourise(split.gray[rows], rng.integers(0, len(COLOURS), n))
