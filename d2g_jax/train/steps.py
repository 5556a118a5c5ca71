"""Pure training steps and their shared tail (paper §3.1–3.3, Table A1).

* `make_train_step`: stage 1's `(state, frozen, batch) → (state, metrics)`: G(z, c) → distillation loss →
  gradients (a `lax.scan` over micro-batches with `train.grad_accum` > 1) → the guarded update.
* `guarded_update`: the tail every step shares (stage 2's `make_stage2_step` too): apply G's (and D's) optimiser
  updates only when the loss and gradient norms are finite — otherwise the state stays the last good one and
  `finite` is reported so the loop can stop — then advance the step and the EMA.
* `global_norm`, `split_micro`.

`frozen = {"text": text-encoder params, "loss": loss variables}`; `batch = {"noise", "latent": [B, h, w, c],
"ids": (per encoder [B, T] int32), "masks": (same)}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from d2g_jax.train.generator import Generator
from d2g_jax.train.optim import ema_update
from d2g_jax.train.state import TrainState


def global_norm(tree: Any) -> jax.Array:
    """√(Σ x²) over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def split_micro(batch: Mapping[str, Any], accum: int) -> Any:
    """[B, ...] → [accum, B/accum, ...] taking rows k, k+accum, ... for micro-batch k, which keeps every
    micro-batch split over the devices exactly like the full batch (no resharding)."""

    def one(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(one, batch)


def guarded_update(state: TrainState, finite: jax.Array, t: ml_collections.ConfigDict, *, tx: Any, grads: Any,
                   dtx: Any = None, d_grads: Any = None) -> TrainState:  # fmt: skip
    """G's update (and D's, when `dtx`/`d_grads` are given) applied only where `finite`; step + EMA advanced.

    The step counter advances only on applied updates, so a non-finite step is replayed exactly on resume; the
    EMA (`t.ema_start`, `t.ema_beta`) follows the applied parameters.
    """
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    def apply(opt, g, params, opt_state):
        updates, new_opt = opt.update(g, opt_state, params)
        new = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        return keep(new, params), keep(new_opt, opt_state)

    params, opt_state = apply(tx, grads, state.params, state.opt_state)
    changes = {"params": params, "opt_state": opt_state}
    if dtx is not None:
        changes["disc"], changes["disc_opt"] = apply(dtx, d_grads, state.disc, state.disc_opt)
    step_next = state.step + jnp.where(finite, 1, 0).astype(state.step.dtype)
    ema = keep(ema_update(state.ema, params, step_next, int(t.ema_start), float(t.ema_beta)), state.ema)
    return state.replace(step=step_next, ema=ema, **changes)


def make_train_step(gen: Generator, text: Any, loss_fn, t: ml_collections.ConfigDict, tx, lr_fn, weight: float):
    """The pure stage-1 step `(state, frozen, batch) → (state, metrics)` (see the module docstring)."""
    accum = int(t.grad_accum)

    def loss_and_aux(params, frozen, mb, rng):
        cond = jax.lax.stop_gradient(text.embed(frozen["text"], mb["ids"], mb["masks"]))
        x0 = gen(params, mb["noise"], cond)
        d = loss_fn(frozen["loss"], x0, mb["latent"], rng).astype(jnp.float32)
        mse = jnp.mean((x0 - mb["latent"]) ** 2)
        return weight * jnp.mean(d), {"distill": jnp.mean(d), "mse": mse}

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, frozen, batch, rng)
        else:
            micro = split_micro(batch, accum)

            def body(carry, xs):
                k, mb = xs
                (loss_k, a), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, k))
                gsum, lsum, asum = carry
                return (jax.tree.map(jnp.add, gsum, g), lsum + loss_k, jax.tree.map(jnp.add, asum, a)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.float32(0), {"distill": jnp.float32(0), "mse": jnp.float32(0)})
            (grads, loss, aux), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, aux = loss / accum, jax.tree.map(lambda a: a / accum, aux)
        gnorm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        new = guarded_update(state, finite, t, tx=tx, grads=grads)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": lr_fn(state.step), "finite": finite, **aux}
        return new, metrics

    return step
