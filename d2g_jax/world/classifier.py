"""The MNIST world's attribute classifier: digit and colour of a 32×32 image, for `config.eval.classifier`.

    python -m d2g_jax.world.classifier --out=/work/world_dev/classifier [--steps=1500 --batch_size=128 --seed=0]

`train_classifier(out_dir, splits, seed=, steps=, batch_size=)` trains `d2g_jax.eval.attributes.AttributeCNN` on
the world's **train** split only (the held-out split is only scored) and writes the classifier folder the project's
evaluation reads (`config.json` with the vocabulary `{"digit": DIGIT_WORDS, "colour": COLOURS}` + `model.safetensors`)
plus `training.json` (the returned metrics).

Each step draws a batch of train digits (seeded per-epoch permutations) in fresh random palette colours
(`data.recoloured_batch`, so every digit is seen in every colour) and augments it inside the jitted step
(`augment`), so that the classifier also reads the imperfect images a generator makes: a random affine map
(rotation ±15°, scale 0.85–1.15, shear ±0.2, shift ±3 px, bilinear), stroke thickening/thinning (3×3 max/min filter
blends), Gaussian blur (σ 0.3–1.3, half the images), brightness 0.55–1.15, per-channel gain ±8%, a background tint
(0–18 levels, half the images) and Gaussian pixel noise (σ 0–10 levels). Held-out accuracy is reported on the
held-out images as they are and on one fixed augmented copy of them.
Everything is a function of `seed`: numpy `default_rng` draws the batches, colours and augmentation parameters on the
host (`augment_params`; a jitted random-number generator costs seconds of XLA:CPU compile per draw), dropout uses
`jax.random` keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.eval import attributes as A
from d2g_jax.world import data as W

# Architecture of the world's classifier (≈ 0.1 M parameters, ≈ 0.4 MB of float32).
STAGES = ((16,), (32, 32), (64,))
FEATURE_DIM = 64
DROPOUT = 0.2


def classifier_config(train: W.Split) -> A.ClassifierConfig:
    """The world's classifier config; `mean`/`std` are the train images' per-channel pixel statistics."""
    x = train.images.reshape(-1, 3).astype(np.float64) / 255.0
    return A.ClassifierConfig(attributes=(("digit", W.DIGIT_WORDS), ("colour", W.COLOURS)), input_size=W.SIDE,
                              stages=STAGES, feature_dim=FEATURE_DIM,
                              mean=tuple(round(float(v), 6) for v in x.mean(0)),
                              std=tuple(round(float(v), 6) for v in x.std(0)), dropout=DROPOUT)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- augmentation


def augment_params(rng: np.random.Generator, b: int, side: int = W.SIDE) -> dict[str, np.ndarray]:
    """The random draws of `augment` for a batch of `b` images, on the host (float32 arrays)."""
    f = lambda v: np.asarray(v, np.float32)
    u = lambda lo, hi, shape=(b,): f(rng.uniform(lo, hi, shape))
    on = lambda p: f(rng.random(b) < p)
    return {
        "angle": u(-math.radians(15), math.radians(15)),
        "scale": f(np.exp(rng.uniform(math.log(0.85), math.log(1.15), b))),
        "shear": u(-0.2, 0.2),
        "shift": u(-3.0, 3.0, (b, 2)),
        "thick": on(0.35) * u(0.0, 0.7),
        "thin": on(0.2) * u(0.0, 0.4),
        "sigma": np.where(on(0.5) > 0, u(0.3, 1.3), f(1e-3)).astype(np.float32),
        "gain": u(0.55, 1.15)[:, None, None, None] * (1.0 + u(-0.08, 0.08, (b, 1, 1, 3))),
        "tint": on(0.5)[:, None, None, None] * u(0.0, 18.0, (b, 1, 1, 3)),
        "noise": u(0.0, 10.0)[:, None, None, None] * f(rng.standard_normal((b, side, side, 3))),
    }


def _affine(p: dict, x: jax.Array) -> jax.Array:
    h, w = x.shape[1:3]
    ang, scale, shear, shift = p["angle"], p["scale"], p["shear"], p["shift"]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    # forward map (row, col offsets from the centre): scale · R(ang) · [[1, shear], [0, 1]], then the shift
    a00, a01, a10, a11 = scale * cos, scale * (cos * shear - sin), scale * sin, scale * (sin * shear + cos)
    det = a00 * a11 - a01 * a10
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    dy = ys[None] - cy - shift[:, 0, None, None]
    dx = xs[None] - cx - shift[:, 1, None, None]
    e = lambda v: v[:, None, None]
    return _bilinear(x, e(i00) * dy + e(i01) * dx + cy, e(i10) * dy + e(i11) * dx + cx)


def _bilinear(x: jax.Array, sy: jax.Array, sx: jax.Array) -> jax.Array:
    """x [B, H, W, C] sampled at (sy, sx) [B, H, W], bilinear, zero outside (one gather per corner)."""
    b, h, w, ch = x.shape
    flat = x.reshape(b, h * w, ch)
    y0, x0 = jnp.floor(sy), jnp.floor(sx)
    out = jnp.zeros_like(x)
    for oy in (0, 1):
        for ox in (0, 1):
            yy, xx = y0 + oy, x0 + ox
            wgt = (1 - jnp.abs(sy - yy)) * (1 - jnp.abs(sx - xx))
            ok = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            idx = (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)).astype(jnp.int32).reshape(b, h * w, 1)
            val = jnp.take_along_axis(flat, idx, axis=1).reshape(b, h, w, ch)
            out = out + jnp.where(ok, wgt, 0.0)[..., None] * val
    return out


def _filter3(x: jax.Array, op: str) -> jax.Array:
    init, fn = (-jnp.inf, jax.lax.max) if op == "max" else (jnp.inf, jax.lax.min)
    return jax.lax.reduce_window(x, init, fn, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")


def _blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable 5-tap Gaussian blur with a per-image σ (zero padding: the background is black)."""
    t = jnp.arange(-2, 3, dtype=jnp.float32)
    k = jnp.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(-1, keepdims=True)  # [B, 5]
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)))
    x = sum(k[:, i, None, None, None] * p[:, i : i + h] for i in range(5))
    p = jnp.pad(x, ((0, 0), (0, 0), (2, 2), (0, 0)))
    return sum(k[:, i, None, None, None] * p[:, :, i : i + w] for i in range(5))


def augment(p: dict, x: jax.Array) -> jax.Array:
    """float32 [B, H, W, 3] in [0, 255] and the draws of `augment_params` → augmented images, same shape (see the
    module docstring); runs inside the training step's jit."""
    e = lambda v: v[:, None, None, None]
    x = _affine(p, x)
    x = x + e(p["thick"]) * (_filter3(x, "max") - x)
    x = x + e(p["thin"]) * (_filter3(x, "min") - x)
    x = _blur(x, p["sigma"])
    return jnp.clip(x * p["gain"] + p["tint"] + p["noise"], 0.0, 255.0)


# -------------------------------------------------------------------------------------------------------- training


def _epoch_batches(n: int, batch_size: int, rng: np.random.Generator):
    while True:
        perm = rng.permutation(n)
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s : s + batch_size]


def accuracies(clf: A.AttributeClassifier, images: np.ndarray, digits: np.ndarray, colours: np.ndarray) -> dict:
    """{digit, colour, both}: shares of images whose predicted attributes equal the labels."""
    pred = clf.predict(images)
    d, c = pred["digit"] == digits, pred["colour"] == colours
    return {"digit": float(d.mean()), "colour": float(c.mean()), "both": float((d & c).mean())}


def train_classifier(out_dir: str, splits: dict[str, W.Split], *, seed: int = 0, steps: int = 1500,
                     batch_size: int = 128, log: Callable[[str], Any] = print) -> dict[str, Any]:  # fmt: skip
    """Trains the world's classifier on `splits["train"]`, scores `splits["heldout"]`, writes the folder `out_dir`
    (`config.json`, `model.safetensors`, `training.json`); returns the metrics (held-out accuracies, seconds, …)."""
    if "train" not in splits or "heldout" not in splits:
        raise ValueError(f"splits must hold 'train' and 'heldout' (d2g_jax.world.data.world_splits()); got "
                         f"{sorted(splits)}.")  # fmt: skip
    train, held = splits["train"], splits["heldout"]
    if batch_size < 1 or batch_size > len(train):
        raise ValueError(f"batch_size={batch_size} must be in [1, {len(train)}] (the train split's size).")
    t0 = time.perf_counter()
    config = classifier_config(train)
    rng = np.random.default_rng([seed, 0x5EED])
    rows_iter = _epoch_batches(len(train), batch_size, rng)

    def batches(step: int):
        rows = next(rows_iter)
        images, _, colours = W.recoloured_batch(train, rows, rng)
        return images, np.stack([train.digits[rows], colours], axis=1), augment_params(rng, len(rows))

    params = A.fit(config, batches, steps=steps, seed=seed, lr=2e-3, warmup=min(100, steps // 10),
                   weight_decay=1e-4, label_smoothing=0.05, augment=augment, log=log,
                   log_every=max(1, min(250, steps // 4)))  # fmt: skip
    train_s = time.perf_counter() - t0
    clf = A.AttributeClassifier(config, params)
    aug = augment_params(np.random.default_rng([seed, 0xA06]), len(held))
    held_aug = np.asarray(jnp.round(jax.jit(augment)(aug, jnp.asarray(held.images, jnp.float32)))).astype(np.uint8)
    sub = np.random.default_rng(seed).permutation(len(train))[: len(held)]
    metrics = {
        "heldout": accuracies(clf, held.images, held.digits, held.colours),
        "heldout_augmented": accuracies(clf, held_aug, held.digits, held.colours),
        "train": accuracies(clf, train.images[sub], train.digits[sub], train.colours[sub]),
    }
    os.makedirs(out_dir, exist_ok=True)
    A.save_classifier(out_dir, config, params)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in (A.CONFIG_NAME, A.WEIGHTS_NAME))
    result = {"out_dir": os.path.abspath(out_dir), "seed": seed, "steps": steps, "batch_size": batch_size,
              "params": int(sum(np.size(v) for v in jax.tree.leaves(params))), "size_bytes": size,
              "train_seconds": train_s, "seconds": time.perf_counter() - t0,
              "heldout_digit_acc": metrics["heldout"]["digit"], "heldout_colour_acc": metrics["heldout"]["colour"],
              "heldout_both_acc": metrics["heldout"]["both"], "accuracy": metrics,
              "train_fingerprint": W.split_fingerprint(train),
              "heldout_fingerprint": W.split_fingerprint(held)}  # fmt: skip
    tmp = os.path.join(out_dir, "training.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "training.json"))
    log(f"classifier → {out_dir}: held-out digit {result['heldout_digit_acc']:.4f}, colour "
        f"{result['heldout_colour_acc']:.4f} (augmented: digit {metrics['heldout_augmented']['digit']:.4f}, colour "
        f"{metrics['heldout_augmented']['colour']:.4f}); {size / 1e6:.2f} MB, {result['seconds']:.0f} s")  # fmt: skip
    return result


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="classifier folder to write")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data_seed", type=int, default=0, help="the world's split/colour seed (world_splits)")
    args = ap.parse_args(argv)
    res = train_classifier(args.out, W.world_splits(args.data_seed), seed=args.seed, steps=args.steps,
                           batch_size=args.batch_size, log=lambda m: print(m, flush=True))  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k != "accuracy"}, indent=1))


if __name__ == "__main__":
    main()
