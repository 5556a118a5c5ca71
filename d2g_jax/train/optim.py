"""Optimiser, learning-rate schedule and EMA of the generator (paper Table A1).

Table A1 (SD-CFG-3/8, SDXL-CFG-7): Adam β = (0.9, 0.999), learning rate 1e-4 → 1e-5, weight decay 1e-2 and 1e-5 on
attention, G EMA from step 4k with β = 0.9999, bfloat16. The paper does not say how the learning rate goes from
1e-4 to 1e-5 nor whether the weight decay is coupled; we use decoupled weight decay (AdamW: `p ← p − lr·wd·p`,
applied to every parameter, with the attention value on the `attn1`/`attn2` projections of the transformer blocks)
and a schedule whose shape is a config field (`cosine` by default, `linear`, `constant`; optional warm-up).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

SCHEDULES = ("cosine", "linear", "constant")
LR_READINGS = ("per_stage", "stage_switch")
ATTENTION_KEYS = ("attn1", "attn2")  # diffusers' self-/cross-attention modules inside BasicTransformerBlock


def learning_rate_schedule(lr: float, lr_end: float, num_steps: int, kind: str = "cosine", warmup: int = 0,
                           field: str = "train"):  # fmt: skip
    """`step ↦ lr`: optional linear warm-up from 0, then `kind` from `lr` to `lr_end` at `num_steps`. `field` is the
    config section the values come from (`train`, `stage2`, `disc`), named in errors."""
    if kind not in SCHEDULES:
        raise ValueError(f"config.{field}.lr_schedule={kind!r}: choose one of {SCHEDULES}.")
    if num_steps <= 0:
        raise ValueError(f"config.{field}: the learning-rate schedule needs a positive number of steps, got "
                         f"{num_steps}.")  # fmt: skip
    decay_steps = max(num_steps - warmup, 1)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "linear":
        main = optax.linear_schedule(lr, lr_end, decay_steps)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=lr_end / lr if lr else 0.0)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def read_lr(t: ml_collections.ConfigDict, reading: str, stage: str) -> ml_collections.ConfigDict:
    """`t` (a stage's G fields: config.train, or stage 2's `stage2_train_config`) with Table A1's "1e-4 → 1e-5"
    read as `reading` (config.train.lr_reading): "per_stage" leaves `t` as it is (lr → lr_end within the stage);
    "stage_switch" makes the stage constant at its arrow end: stage 1 at `t.lr`, stage 2 at `t.lr_end`."""
    if reading not in LR_READINGS:
        raise ValueError(f"config.train.lr_reading={reading!r}: choose one of {LR_READINGS}.")
    if reading == "per_stage":
        return t
    t = t.copy_and_resolve_references()
    with t.unlocked():
        if stage == "stage2":
            t.lr = t.lr_end
        t.lr_end = t.lr
        t.lr_schedule = "constant"
    return t


def attention_mask(params: Any) -> Any:
    """True for parameters of attention modules (any path component in `ATTENTION_KEYS`)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: any(p in ATTENTION_KEYS for p in k) for k in flat})


def make_optimizer(
    params: Any,
    *,
    lr: float,
    lr_end: float,
    num_steps: int,
    schedule: str = "cosine",
    warmup: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    weight_decay_attention: float = 1e-5,
    grad_clip: float = 0.0,
    field: str = "train",
) -> tuple[optax.GradientTransformation, Any]:
    """Adam + decoupled weight decay (attention-specific) + schedule (+ global-norm clipping when > 0).

    Returns `(tx, lr_fn)`; `params` only provides the tree structure for the attention mask.
    """
    lr_fn = learning_rate_schedule(lr, lr_end, num_steps, schedule, warmup, field=field)
    attn = attention_mask(params)
    not_attn = jax.tree.map(lambda a: not a, attn)
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=not_attn))
    if weight_decay_attention:
        parts.append(optax.add_decayed_weights(weight_decay_attention, mask=attn))
    parts.append(optax.scale_by_learning_rate(lr_fn))
    return optax.chain(*parts), lr_fn


def optimizer_from_config(params: Any, t: ml_collections.ConfigDict, num_steps: int, field: str = "train"):
    """`make_optimizer` with the fields of `config.train` (or `config.disc` for D: `field="disc"`)."""
    return make_optimizer(
        params, lr=t.lr, lr_end=t.lr_end, num_steps=num_steps, schedule=t.lr_schedule, warmup=t.warmup_steps,
        b1=t.b1, b2=t.b2, eps=t.adam_eps, weight_decay=t.weight_decay, weight_decay_attention=t.weight_decay_attention,
        grad_clip=t.grad_clip, field=field,
    )  # fmt: skip


def ema_update(ema: Any, params: Any, step: jax.Array, start: int, beta: float) -> Any:
    """EMA after optimiser step `step` (0-based count of updates applied so far, *after* this update).

    Before `start` the EMA follows the parameters exactly (it starts from the weights at step `start`, as the
    paper's "G ema start 4k" prescribes); from then on `ema ← β·ema + (1 − β)·params`.
    """
    b = jnp.where(step >= start, jnp.float32(beta), jnp.float32(0.0))
    return jax.tree.map(lambda e, p: (b * e.astype(jnp.float32) + (1 - b) * p.astype(jnp.float32)).astype(e.dtype),
                        ema, params)  # fmt: skip
