"""The two attention paths (XLA's fused `dot_product_attention` and the CPU query-blocked one) agree with a
plain NumPy softmax attention, including query blocks that do not divide the sequence and upcasting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2g_jax.models import blocks


def _reference(q, k, v, heads):
    b, tq, d = q.shape
    h = d // heads
    qh = q.reshape(b, tq, heads, h).transpose(0, 2, 1, 3)
    kh = k.reshape(b, -1, heads, h).transpose(0, 2, 1, 3)
    vh = v.reshape(b, -1, heads, h).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(h)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, tq, d)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
@pytest.mark.parametrize("tq, tk", [(64, 64), (37, 11), (300, 77)])
def test_attention_matches_numpy(impl, tq, tk):
    rng = np.random.default_rng(tq + tk)
    q, k, v = (rng.standard_normal((2, t, 24)).astype(np.float32) for t in (tq, tk, tk))
    out = jax.jit(lambda q, k, v: blocks.attention_core(q, k, v, heads=3, impl=impl))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, 3), rtol=1e-5, atol=1e-5)


def test_blocked_attention_uses_several_blocks_and_grads_match():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 50, 2, 8)).astype(np.float32) for _ in range(3))
    f_block = lambda q, k, v: blocks._blocked_attention(q, k, v, block_elems=7 * 50).sum()  # 7-query blocks
    f_xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v).sum()
    np.testing.assert_allclose(f_block(q, k, v), f_xla(q, k, v), rtol=1e-5)
    g1 = jax.grad(f_block, argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(f_xla, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_upcast_keeps_output_dtype():
    q = jnp.ones((1, 4, 8), jnp.bfloat16)
    assert blocks.attention_core(q, q, q, heads=2, upcast=True).dtype == jnp.bfloat16
