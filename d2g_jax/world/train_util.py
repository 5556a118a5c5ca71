"""Shared pieces of the MNIST world's teacher trainers (`world/vae.py`, `world/teacher.py`).

* `init_params`: init-like random values drawn in NumPy straight into a `jax.eval_shape` tree (the scheme of
  `d2g_jax.models.tiny.random_params`), optionally zeroing chosen output layers; nothing is initialised twice.
* `epoch_rows`: the train split's rows in seeded per-epoch permutations, cut into fixed-size batches.
* `ravel`: parameters as one flat vector (with its inverse); the trainers keep parameters, Adam moments and the EMA
  flat, so the optimiser's update is a few XLA ops rather than a few per tensor (XLA:CPU compile time).
* `adamw`: AdamW with linear warm-up and cosine decay, global-norm clipping.
* `ema_update` / `ema_decay`: the exponential moving average of the parameters the U-Net teacher exports.
* `padded_batches`: a jitted function over an array in fixed-size chunks (one compile).
* `fresh_folder` / `publish_folder`: model folders are written under a temporary name and renamed into place;
  a non-empty target is refused with a message naming it.
* `write_model_folder`: `config.json` + a safetensors file named through `convert.flax_to_torch`, as
  `d2g_jax.models.tiny` writes them (optionally float16 storage: our loaders upcast to the module's float32 params).

Everything is a pure function of its seed: NumPy's `default_rng` draws data order, colours and noise on the host
(a random-number generator inside a jitted step costs seconds of XLA:CPU compile).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from d2g_jax.models.convert import Renames, flax_to_torch
from d2g_jax.models.tiny import random_params
from d2g_jax.models.weights import write_safetensors

Log = Callable[[str], Any]


def init_params(abstract: Any, seed: int, zero: Sequence[str] = ()) -> dict[str, Any]:
    """`tiny.random_params(abstract, seed)` (N(0, 1/fan_in) kernels, N(0, 0.02) embeddings, unit norm scales, zero
    biases; host float32) with every leaf whose '/'-joined path contains one of `zero` set to zeros."""
    params = random_params(abstract, seed)
    if not zero:
        return params
    flat = traverse_util.flatten_dict(params)
    hit = {p: np.zeros_like(v) if any(z in "/".join(p) for z in zero) else v for p, v in flat.items()}
    missing = [z for z in zero if not any(z in "/".join(p) for p in flat)]
    if missing:
        raise ValueError(f"init_params: no parameter path contains {missing}; check the module's attribute names.")
    return traverse_util.unflatten_dict(hit)


def param_count(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def epoch_rows(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of row indices into a split of `n` rows: a fresh permutation per epoch, the last partial
    batch of each epoch dropped (every batch has `batch_size` rows)."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} rows of the split.")
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def adamw(lr: float, steps: int, *, warmup: int, weight_decay: float, clip: float = 1.0, b2: float = 0.999):
    """AdamW (β 0.9, `b2`), lr: linear warm-up over `warmup` steps, then cosine to lr/10 at `steps`."""
    warmup = max(1, min(warmup, steps - 1)) if steps > 1 else 1
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(schedule, b1=0.9, b2=b2, weight_decay=weight_decay)
    ), schedule


def ema_update(ema: Any, params: Any, decay: jax.Array | float) -> Any:
    """`ema ← decay · ema + (1 − decay) · params`, leaf-wise."""
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)


def ema_decay(step: jax.Array, beta: float) -> jax.Array:
    """EMA decay with a warm-up, `min(beta, (1 + step) / (10 + step))`, so early averages are not dominated by
    the random initialisation on short runs."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(beta, (1.0 + step) / (10.0 + step))


def padded_batches(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int) -> Any:
    """`fn` over `x` in chunks of exactly `batch` rows (a short last chunk is zero-padded, so a jitted `fn` compiles
    once); the outputs (an array or a tuple of arrays) concatenated and cut to len(x)."""
    n = len(x)
    outs = []
    for i in range(0, n, batch):
        chunk = x[i : i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        outs.append(jax.tree.map(np.asarray, fn(chunk)))
    return jax.tree.map(lambda *a: np.concatenate(a)[:n], *outs)


def ravel(params: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """(one float32 vector of all parameters, its inverse): the trainers keep parameters, Adam moments and the EMA
    flat, so the optimiser update is a handful of XLA ops instead of a few per tensor (compile time on CPU)."""
    return ravel_pytree(params)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] → float32 in [-1, 1] (the VAE's image range)."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 (clipped, rounded), as diffusers' image post-processing."""
    return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def check_target(folder: str) -> None:
    """Refuses a target model folder that exists and is not empty."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder}: exists and is not empty; refusing to overwrite it. Remove it or pass a "
                              "new folder.")  # fmt: skip
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder}: exists and is not a folder; pass a new folder path.")


def fresh_folder(folder: str) -> str:
    """Checks `folder` (see `check_target`) and returns an empty temporary sibling to write into."""
    check_target(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(folder))}.tmp{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def publish_folder(tmp: str, folder: str) -> str:
    """Renames the finished temporary folder onto `folder` (an empty `folder` is replaced); returns `folder`."""
    check_target(folder)
    if os.path.isdir(folder):
        os.rmdir(folder)
    os.replace(tmp, folder)
    return folder


def write_model_folder(
    folder: str,
    config: dict[str, Any],
    params: dict[str, Any],
    weights: str,
    *,
    renames: Renames = (),
    dtype: Any = None,
) -> None:
    """Writes `folder/config.json` and `folder/<weights>` (PyTorch names via `flax_to_torch`) into an existing
    folder (the caller's temporary one). `dtype` (e.g. np.float16) sets the stored tensor dtype."""
    tensors = flax_to_torch(params, renames=renames, dtype=dtype)
    write_safetensors(os.path.join(folder, weights), tensors, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def folder_bytes(folder: str) -> int:
    """Total size of the files under `folder`."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


class Progress:
    """Logs `what step/steps key=value … s/step ETA` every `every` steps (and at the last step)."""

    def __init__(self, what: str, steps: int, log: Log, every: int):
        self.what, self.steps, self.log, self.every = what, steps, log, max(1, every)
        self.start = time.perf_counter()

    def __call__(self, step: int, **metrics: float) -> None:
        done = step + 1
        if done % self.every and done != self.steps:
            return
        el = time.perf_counter() - self.start
        parts = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        eta = el / done * (self.steps - done)
        self.log(f"{self.what} {done}/{self.steps} {parts} {el / done:.3f}s/step eta {eta:.0f}s")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
