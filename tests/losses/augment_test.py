"""E-LatentLPIPS augmentations: hand-computed cases, parity with the official (StyleGAN2-ADA) torch pipeline
with the same parameters, shared draws for both inputs, sampling statistics, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import nchw, replay_official_draws
from elatentlpips.ada_aug import AdaAugment
from elatentlpips.elatentlpips import ada_augpipe
from scipy.special import erfinv

from d2g_jax.losses import augment as A

B, H, W, C = 2, 12, 16, 4
# The warp sums ~50 float32 products per output; compare with 1e-5 of the signal scale (max |x| ≈ 4 here).
WARP_TOL = 1e-5
apply = jax.jit(A.apply_params, static_argnames="preset")
warp = jax.jit(A.warp)
sample = jax.jit(A.sample_params, static_argnums=(1, 2, 3, 4))
N_SAMPLES = 4096


def _x(seed: int, shape=(B, H, W, C)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _identity(b: int = B, **kw) -> A.AugmentParams:
    p = dict(g_inv=jnp.broadcast_to(jnp.eye(3), (b, 3, 3)), brightness=jnp.zeros(b), contrast=jnp.ones(b),
             saturation=jnp.ones(b), cutout_center=jnp.full((b, 2), 0.5), cutout_size=jnp.zeros(b))  # fmt: skip
    p.update({k: jnp.asarray(v, jnp.float32) for k, v in kw.items()})
    return A.AugmentParams(**p)


def _official_ada(preset: str, x0, x1, **kw):
    aug = AdaAugment(**ada_augpipe[preset]).train().requires_grad_(False)
    aug.p = torch.tensor(1.0)  # as ELatentLPIPS sets it
    with torch.no_grad():
        t0, t1 = aug(nchw(x0), nchw(x1), **kw)
    return t0.numpy().transpose(0, 2, 3, 1), t1.numpy().transpose(0, 2, 3, 1)


def _close(ours, ref, what):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=WARP_TOL * np.abs(ref).max(), err_msg=what)


def test_presets_match_the_official_table():
    for name, ops in ada_augpipe.items():
        assert A.PRESETS[name] == ops, name
    assert set(A.PRESETS) - set(ada_augpipe) == {"bgo"}  # Table A1's "bg + cutout"
    with pytest.raises(ValueError, match="unknown augmentation preset 'bgx'.*bgco"):
        A.augment_pair(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 4)), "bgx")
    with pytest.raises(ValueError, match="one shape"):
        A.apply_params(_identity(1), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 9, 4)), "b")


def test_identity_parameters_leave_inputs_unchanged():
    x0, x1 = _x(0), _x(1)
    for preset in ("bgco", "co"):  # with and without the geometric warp
        y0, y1 = apply(_identity(), jnp.asarray(x0), jnp.asarray(x1), preset=preset)
        _close(y0, x0, preset)
        _close(y1, x1, preset)


def test_integer_translation_is_a_reflect_padded_shift():
    x = _x(2)
    tx, ty = 3, -2  # output pixel p samples input p − t: content moves right by 3 and up by 2
    y = warp(jnp.asarray(x), A.geometric_matrix(B, int_shift=(tx, ty)))
    padded = np.pad(x, ((0, 0), (2, 2), (3, 3), (0, 0)), mode="reflect")  # torch 'reflect' = numpy 'reflect'
    _close(y, padded[:, 4 : 4 + H, 0:W], "integer shift")


@pytest.mark.parametrize("preset", ["b", "g", "bg"])
def test_geometric_warp_matches_official_with_the_same_parameters(preset):
    """ADA's `debug_percentile=q` fixes every parameter: flip = ⌊2q⌋, quarter turns = ⌊4q⌋, shift (2q−1)/8,
    scales 2^(erfinv(2q−1)·0.2), pre-rotation (2q−1)π, fractional shift erfinv(2q−1)/8 (post-rotation 0)."""
    x0, x1 = _x(3), _x(4)
    cfg = A.PRESETS[preset]
    for q in (0.1, 0.3, 0.6, 0.9):  # covers flip on/off and 0..3 quarter turns
        ref0, ref1 = _official_ada(preset, x0, x1, debug_percentile=q)
        e, t = erfinv(2 * q - 1), np.float32((2 * q - 1) * A.XINT_MAX)
        geo = dict(
            xflip=np.floor(q * 2), rot90=np.floor(q * 4), int_shift=(np.round(t * W), np.round(t * H)),
            scale=np.exp2(e * A.SCALE_STD), rotate_pre=(2 * q - 1) * np.pi, aniso=np.exp2(e * A.ANISO_STD),
            frac_shift=(e * A.XFRAC_STD * W, e * A.XFRAC_STD * H),
        )  # fmt: skip
        used = dict(xflip="xflip", rot90="rotate90", int_shift="xint", scale="scale", rotate_pre="rotate",
                    aniso="aniso", frac_shift="xfrac")  # fmt: skip
        g = A.geometric_matrix(B, **{k: v for k, v in geo.items() if cfg.get(used[k])})
        y0, y1 = apply(_identity(g_inv=g), jnp.asarray(x0), jnp.asarray(x1), preset=preset)
        _close(y0, ref0, f"{preset} q={q} input 0")
        _close(y1, ref1, f"{preset} q={q} input 1")


def test_full_pipeline_matches_official_random_draws():
    """'bgco' with the official run's own random numbers (replayed from the torch seed)."""
    x0, x1 = _x(5), _x(6)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        ref0, ref1 = _official_ada("bgco", x0, x1)
        y0, y1 = apply(replay_official_draws(seed, B, H, W), jnp.asarray(x0), jnp.asarray(x1), preset="bgco")
        _close(y0, ref0, f"seed {seed} input 0")
        _close(y1, ref1, f"seed {seed} input 1")


def test_colour_formulas():
    x0, x1 = _x(7), _x(8)
    b, c, s = np.array([0.3, -0.2]), np.array([1.4, 0.6]), np.array([0.5, 1.7])
    y0, y1 = apply(_identity(brightness=b, contrast=c, saturation=s), jnp.asarray(x0), jnp.asarray(x1), preset="c")
    for x, y in ((x0, y0), (x1, y1)):
        r = x + b[:, None, None, None]
        m = r.mean(axis=(1, 2, 3), keepdims=True)  # each input about its own mean
        r = (r - m) * c[:, None, None, None] + m
        m = r.mean(axis=3, keepdims=True)  # per-pixel channel mean
        r = (r - m) * s[:, None, None, None] + m
        np.testing.assert_allclose(np.asarray(y), r, rtol=1e-5, atol=1e-5)
    x = _x(9, (B, H, W, 1))  # saturation is skipped for one channel, as in the official code
    y, _ = apply(_identity(saturation=s), jnp.asarray(x), jnp.asarray(x), preset="c")
    np.testing.assert_allclose(np.asarray(y), x, atol=1e-6)


def test_cutout_mask():
    x = np.ones((1, 8, 8, 2), np.float32)
    y, _ = apply(_identity(1, cutout_center=[[0.25, 0.75]], cutout_size=[0.5]), jnp.asarray(x), jnp.asarray(x),
                 preset="o")  # fmt: skip
    expected = np.ones((8, 8), np.float32)
    expected[4:8, 0:4] = 0  # |(j+½)/8 − ¼| < ¼ → columns 0..3; |(i+½)/8 − ¾| < ¼ → rows 4..7
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], expected)
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 1], expected)


def test_one_draw_per_example_shared_by_both_inputs():
    key = jax.random.PRNGKey(3)
    x0, x1, x2 = (jnp.asarray(_x(s)) for s in (10, 11, 12))
    pair = jax.jit(A.augment_pair, static_argnames="preset")
    a0, a1 = pair(key, x0, x0, preset="bgco")
    np.testing.assert_array_equal(np.asarray(a0), np.asarray(a1))
    b0, _ = pair(key, x0, x1, preset="bgco")
    c0, _ = pair(key, x0, x2, preset="bgco")
    np.testing.assert_array_equal(np.asarray(b0), np.asarray(c0))  # x0's transform does not depend on its partner
    g_inv = np.asarray(sample(key, N_SAMPLES, 64, 64, "bgco").g_inv[:8])
    assert len({tuple(np.round(g.ravel(), 5)) for g in g_inv}) == 8  # per-example draws
    d0, _ = pair(jax.random.PRNGKey(4), x0, x1, preset="bgco")
    assert not np.allclose(np.asarray(b0), np.asarray(d0))  # a new key, a new draw


def test_sampling_distributions():
    prm = sample(jax.random.PRNGKey(0), N_SAMPLES, 64, 64, "bgco")
    br, co, sa = (np.asarray(v) for v in (prm.brightness, prm.contrast, prm.saturation))
    assert -0.5 <= br.min() and br.max() <= 0.5 and 0.5 <= co.min() and co.max() <= 1.5
    assert 0 <= sa.min() and sa.max() <= 2 and np.all(np.asarray(prm.cutout_size) == 0.5)
    # det(G_inv) = ±1/s²: log2|det| ~ N(0, (2·0.2)²); flips make half of the determinants negative.
    det = np.linalg.det(np.asarray(prm.g_inv, np.float64))
    ld = np.log2(np.abs(det))
    assert abs(ld.mean()) < 0.03 and abs(ld.std() - 0.4) < 0.03
    assert abs((det < 0).mean() - 0.5) < 0.05
    assert np.array_equal(np.asarray(A.sample_params(jax.random.PRNGKey(0), 2, 8, 8, "co").g_inv[0]), np.eye(3))
    off = sample(jax.random.PRNGKey(0), N_SAMPLES, 64, 64, "bgco", 0.0)  # ADA strength p = 0: no geometry/cutout
    assert np.array_equal(np.asarray(off.g_inv), np.broadcast_to(np.eye(3), (N_SAMPLES, 3, 3)))
    assert np.all(np.asarray(off.cutout_size) == 0)


def test_upsample_backward_is_the_adjoint():
    """`_upsample_axis` has a hand-written VJP; check it against the transpose of the operator's dense matrix."""
    n = 7
    for axis in (1, 2):
        basis = np.eye(n, dtype=np.float32).reshape((n, n, 1, 1) if axis == 1 else (n, 1, n, 1))
        m = np.asarray(A._upsample_axis(jnp.asarray(basis), axis)).reshape(n, 2 * n).T  # [2n, n]
        gy = _x(15, (1, 2 * n, 1, 1) if axis == 1 else (1, 1, 2 * n, 1))
        _, vjp = jax.vjp(
            lambda v, a=axis: A._upsample_axis(v, a), jnp.zeros(gy.shape[:axis] + (n,) + gy.shape[axis + 1 :])
        )
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(gy))[0]).ravel(), m.T @ gy.ravel(), atol=1e-6)


def test_gradients_flow_and_are_finite():
    x0, x1 = jnp.asarray(_x(13)), jnp.asarray(_x(14))

    def loss(a, key):
        y0, y1 = A.augment_pair(key, a, x1, "bgco")
        return jnp.mean((y0 - y1) ** 2)

    g = jax.jit(jax.grad(loss))(x0, jax.random.PRNGKey(5))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
