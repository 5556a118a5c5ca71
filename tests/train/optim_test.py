"""Table A1's optimiser: Adam(0.9, 0.999), decoupled weight decay 1e-2 / 1e-5 on attention, lr 1e-4 → 1e-5,
EMA from step `start` with β; and the sharding of optimiser state that mirrors the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from d2g_jax.models.tiny import TINY_UNET
from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables
from d2g_jax.sharding import make_mesh
from d2g_jax.train.optim import attention_mask, ema_update, learning_rate_schedule, make_optimizer
from d2g_jax.train.state import mirror_shardings


@pytest.fixture(scope="module")
def params():
    import flax.linen as nn

    abstract = nn.unbox(abstract_variables(UNet2DConditionModel(TINY_UNET))["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), abstract)


def test_attention_mask_selects_attn_projections(params):
    flat = traverse_util.flatten_dict(attention_mask(params))
    attn = [k for k, v in flat.items() if v]
    assert attn and all(("attn1" in k) or ("attn2" in k) for k in attn)
    names = {"/".join(k) for k in attn}
    assert any(n.endswith("attn2/to_k/kernel") for n in names) and any(n.endswith("attn1/to_out_0/kernel") for n in names)
    assert not any("resnets" in n or "proj_in" in n for n in names)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_goes_from_lr_to_lr_end(kind):
    f = learning_rate_schedule(1e-4, 1e-5, 1000, kind)
    assert float(f(0)) == pytest.approx(1e-4)
    assert float(f(1000)) == pytest.approx(1e-5)
    assert 1e-5 < float(f(500)) < 1e-4
    w = learning_rate_schedule(1e-4, 1e-5, 1000, kind, warmup=100)
    assert float(w(0)) == 0.0 and float(w(100)) == pytest.approx(1e-4) and float(w(1000)) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_schedule(1e-4, 1e-5, 1000, "step")


def test_decoupled_weight_decay_per_group(params):
    """With zero gradients Adam's direction is 0, so an update is exactly −lr·wd·p (wd by group)."""
    tx, _ = make_optimizer(params, lr=1e-4, lr_end=1e-4, num_steps=10, schedule="constant")
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    mask = attention_mask(params)
    for u, p, a in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(mask)):
        wd = 1e-5 if a else 1e-2
        np.testing.assert_allclose(u, -1e-4 * wd * p, rtol=1e-6, atol=0)


def test_adam_step_matches_optax_adamw_without_decay(params):
    tx, _ = make_optimizer(params, lr=1e-3, lr_end=1e-3, num_steps=10, schedule="constant", weight_decay=0.0,
                           weight_decay_attention=0.0)  # fmt: skip
    ref = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
    g = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    u1, _ = tx.update(g, tx.init(params), params)
    u2, _ = ref.update(g, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ema_follows_params_before_start_then_averages():
    ema, p = {"w": jnp.float32(0.0)}, {"w": jnp.float32(1.0)}
    assert float(ema_update(ema, p, jnp.int32(3), start=4, beta=0.9)["w"]) == 1.0  # before start: a copy
    assert float(ema_update(ema, p, jnp.int32(4), start=4, beta=0.9)["w"]) == pytest.approx(0.1)
    assert float(ema_update({"w": jnp.float32(2.0)}, p, jnp.int32(9), start=4, beta=0.9)["w"]) == pytest.approx(1.9)


def test_opt_state_mirrors_param_shardings(params):
    mesh = make_mesh(-1, 1)
    from jax.sharding import NamedSharding, PartitionSpec

    # A recognisable spec per parameter (fsdp axis of size 1: any spec is valid) to see where it is copied.
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, PartitionSpec(*([None] * (p.ndim - 1)), "fsdp"))
                             if p.ndim else NamedSharding(mesh, PartitionSpec()), params)  # fmt: skip
    tx, _ = make_optimizer(params, lr=1e-4, lr_end=1e-5, num_steps=10)
    opt = jax.eval_shape(tx.init, params)
    out = mirror_shardings(opt, params, shardings, mesh)
    flat = jax.tree_util.tree_flatten_with_path(out)[0]
    mu = [s for path, s in flat if "mu" in jax.tree_util.keystr(path)]
    assert len(mu) == len(jax.tree.leaves(params))
    assert all(s.spec[-1] == "fsdp" for s in mu if len(s.spec))
    counts = [s for path, s in flat if "count" in jax.tree_util.keystr(path)]
    assert counts and all(s.spec == PartitionSpec() for s in counts)
