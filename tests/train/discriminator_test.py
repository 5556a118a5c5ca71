"""The stage-2 discriminator of Diffusion2GAN (paper §3.3, Fig. 7), its losses and the stage-2 step.

Covered:
* zero-initialised `z_conv` / `input_proj_*`: the initial D's U-Net read-out is the teacher's ε-prediction, both
  against our Flax U-Net and against diffusers' PyTorch `UNet2DConditionModel` (and z / the multi-scale input do
  change it once those convs are non-zero); `init_disc_params` against the module's own tree;
* read-out count, shapes per decoder scale and parameter names for every combination of the three flags;
* single-sample R1, `r1_score`, the non-saturating D/G losses against hand computations on toy maps;
* the mix-and-match row plan and the pairs/labels it builds;
* one jitted stage-2 step (G + D + lazy R1) on the tiny pipeline: finite metrics, every G and D parameter moves
  (the zero-initialised ones included), frozen text/loss variables stay outside the state;
* `jax.grad` through the step (toy G/D, real text encoder): no D-loss gradient into G (detached fakes), no
  gradient into the text encoder (stop_gradient on the conditioning), while the values do depend on both.

The pipeline is the tiny one with plain (attention-free) down/up blocks, text entering through the mid block's
cross-attention: the same D seams, and the single stage-2 compilation (G, three D passes, second-order R1, two
Adams) stays affordable on a 2-core CPU.
"""

import dataclasses
import functools
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from stage2_toys import ToyDisc, ToyGenerator, make_batch, make_state, stage2_config

from d2g_jax.models.text import TextEncoder
from d2g_jax.models.tiny import TINY_UNET, write_tiny_pipeline
from d2g_jax.models.unet import load_unet
from d2g_jax.sampling import DDIMSchedule, _vae_scale_factor
from d2g_jax.train.discriminator import (
    Discriminator,
    abstract_disc_variables,
    init_disc_params,
    mean_logit,
    mix_and_match,
    mix_and_match_rows,
    ns_d_loss,
    ns_g_loss,
    r1_penalty,
    r1_score,
)
from d2g_jax.train.distill import load_distill_loss
from d2g_jax.train.generator import Generator
from d2g_jax.train.stage2 import make_stage2_step, stage2_train_config

FLAGS = list(itertools.product([False, True], repeat=3))  # (z_cond, multiscale_in, multiscale_out)
# The tiny U-Net without the down/up-block transformers (see the module docstring).
SMALL_UNET = dataclasses.replace(TINY_UNET, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_tiny_pipeline(str(tmp_path_factory.mktemp("disc") / "pipe"), seed=5, unet=SMALL_UNET, text_layers=1)


@pytest.fixture(scope="module")
def teacher(tiny_pipeline):
    module, variables = load_unet(tiny_pipeline)
    return module, variables


# ----------------------------------------------------------------------------------------------------------
# The initial D is the teacher.


def test_initial_d_output_is_the_teacher_eps_prediction(tiny_pipeline, teacher):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    unet, variables = teacher
    disc = Discriminator(unet, z_cond=True, multiscale_in=True, multiscale_out=True)
    dparams = init_disc_params(disc, variables["params"], seed=1)
    # init_disc_params: the module's own tree, the teacher's params under "unet", zero input convs, unit-norm
    # random 1×1 read-outs.
    abstract = nn.unbox(abstract_disc_variables(disc))["params"]
    assert jax.tree.structure(dparams) == jax.tree.structure(abstract)
    jax.tree.map(lambda p, a: np.testing.assert_equal(np.shape(p), a.shape), dparams, abstract)
    assert dparams["unet"] is variables["params"]
    for name, sub in dparams.items():
        if name in ("z_conv", "input_proj_0"):
            assert all(not np.any(leaf) for leaf in jax.tree.leaves(sub)), name
        elif name.startswith("readout_"):
            assert np.all(sub["norm"]["scale"] == 1) and not np.any(sub["norm"]["bias"])
            assert np.any(sub["conv"]["kernel"]) and not np.any(sub["conv"]["bias"])

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([0, 437], np.int32)

    d_apply = jax.jit(disc.apply)
    maps = d_apply({"params": dparams}, x, z, t, ctx)
    ours = np.asarray(maps[0])
    ref_flax = np.asarray(jax.jit(unet.apply)(variables, x, t, ctx))
    assert ours.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(ours, ref_flax, atol=1e-6, rtol=0)

    torch_unet = TorchUNet.from_pretrained(os.path.join(tiny_pipeline, "unet")).eval()
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t.astype(np.int64)),
                         torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()  # fmt: skip
    scale = np.abs(ref).max()
    assert scale > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0)  # fp32, relative to max |ε|

    # The zero-init is what makes this hold: non-zero z / multi-scale input convs change D's output, and the
    # z-conditioning really reads z.
    rand = lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
    with_z = {**dparams, "z_conv": jax.tree.map(rand, dparams["z_conv"])}
    out_z = np.asarray(d_apply({"params": with_z}, x, z, t, ctx)[0])
    assert np.abs(out_z - ref_flax).max() > 1e-3
    out_z2 = np.asarray(d_apply({"params": with_z}, x, -z, t, ctx)[0])
    assert np.abs(out_z2 - out_z).max() > 1e-3
    with_in = {**dparams, "input_proj_0": jax.tree.map(rand, dparams["input_proj_0"])}
    out_in = np.asarray(d_apply({"params": with_in}, x, z, t, ctx)[0])
    assert np.abs(out_in - ref_flax).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Read-outs and parameters per flag combination (shapes only: `jax.eval_shape`, no compilation).


@pytest.mark.parametrize("z_cond,ms_in,ms_out", FLAGS)
def test_readouts_and_parameters_per_flags(teacher, z_cond, ms_in, ms_out):
    unet, variables = teacher
    c = unet.config
    n_up = len(c.up_block_types)
    assert n_up == 2 and len(c.block_out_channels) == 2  # the tiny U-Net: scales 1/2 and 1
    disc = Discriminator(unet, z_cond=z_cond, multiscale_in=ms_in, multiscale_out=ms_out)

    b, h, w = 3, 8, 16  # non-square: catches swapped axes
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    maps, abstract = jax.eval_shape(disc.init_with_output, jax.random.PRNGKey(0), spec(b, h, w, 4), spec(b, h, w, 4),
                                    jax.ShapeDtypeStruct((b,), jnp.int32), spec(b, 77, 32))  # fmt: skip
    params = nn.unbox(abstract["params"])
    expected = {"unet"}
    if z_cond:
        expected.add("z_conv")
    if ms_in:
        expected |= {f"input_proj_{i}" for i in range(len(c.block_out_channels) - 1)}
    if ms_out:
        expected |= {f"readout_{k}_{j}" for k in ("skip", "up", "out") for j in range(n_up)}
    assert set(params) == expected
    assert jax.tree.structure(params["unet"]) == jax.tree.structure(variables["params"])
    if z_cond:  # z [.., 4] → the hidden state after conv_in
        assert params["z_conv"]["kernel"].shape == (3, 3, 4, c.block_out_channels[0])
    if ms_in:  # the half-resolution latent → the hidden state entering down block 1
        assert params["input_proj_0"]["kernel"].shape == (3, 3, 4, c.block_out_channels[0])
    for name in expected:
        if name.startswith("readout_"):
            assert params[name]["conv"]["kernel"].shape[:2] == (1, 1) and params[name]["conv"]["kernel"].shape[-1] == 1

    assert len(maps) == (1 + 3 * n_up if ms_out else 1)
    assert maps[0].shape == (b, h, w, 4)
    assert all(m.dtype == jnp.float32 for m in maps)
    if ms_out:
        for j in range(n_up):  # coarse to fine: up block j works at 1 / 2^(n_up − 1 − j)
            f = 2 ** (n_up - 1 - j)
            for k in range(3):
                assert maps[1 + 3 * j + k].shape == (b, h // f, w // f, 1), (j, k)


# ----------------------------------------------------------------------------------------------------------
# R1 and the non-saturating losses against hand computations.


def test_r1_single_sample_matches_closed_form():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (4, 5, 2)).astype(np.float32)
    quad = lambda v: jnp.sum(w * v**2, axis=(1, 2, 3))  # ∇ = 2 w x

    single = float(r1_penalty(quad, jnp.asarray(x[:1])))
    np.testing.assert_allclose(single, np.sum((2 * w * x[0]) ** 2), rtol=1e-5)
    per_sample = np.sum((2 * w * x) ** 2, axis=(1, 2, 3))
    assert np.ptp(per_sample) > 1e-3  # the mean below differs from any one sample's value
    np.testing.assert_allclose(float(r1_penalty(quad, jnp.asarray(x))), per_sample.mean(), rtol=1e-5)

    a = rng.standard_normal((4, 5, 2)).astype(np.float32)
    linear = lambda v: jnp.sum(a * v, axis=(1, 2, 3))  # ∇ = a for every x
    np.testing.assert_allclose(float(r1_penalty(linear, jnp.asarray(x[:1]))), np.sum(a**2), rtol=1e-5)

    # Through r1_score on maps of different shapes: score = (Σ w1·x + Σ w2·Σ_c x) / 2 → ∇ = (w1 + w2) / 2.
    w1 = rng.standard_normal((4, 5, 2)).astype(np.float32)
    w2 = rng.standard_normal((4, 5, 1)).astype(np.float32)
    maps_fn = lambda v: (w1 * v, w2 * jnp.sum(v, axis=-1, keepdims=True))
    pen = float(r1_penalty(lambda v: r1_score(maps_fn(v)), jnp.asarray(x[1:2])))
    np.testing.assert_allclose(pen, np.sum(((w1 + w2) / 2) ** 2), rtol=1e-5)


def test_r1_score_is_mean_over_maps_of_per_sample_sums():
    rng = np.random.default_rng(2)
    maps = [rng.standard_normal(s).astype(np.float32) for s in ((3, 8, 8, 4), (3, 4, 4, 1), (3, 2, 2, 1))]
    expected = sum(m.sum(axis=(1, 2, 3)) for m in maps) / 3
    got = np.asarray(r1_score([jnp.asarray(m) for m in maps]))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_non_saturating_losses_match_hand_computation():
    rng = np.random.default_rng(3)
    shapes = ((2, 8, 8, 4), (2, 4, 4, 1), (2, 2, 2, 1))
    real = [(3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    fake = [(3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    real[2][0, 0, 0, 0], fake[1][1, 0, 0, 0] = -100.0, 100.0  # softplus must not overflow
    softplus = lambda v: np.logaddexp(0.0, v.astype(np.float64))

    d_ref = np.mean([softplus(-r).mean() for r in real]) + np.mean([softplus(f).mean() for f in fake])
    g_ref = np.mean([softplus(-f).mean() for f in fake])
    d = float(ns_d_loss([jnp.asarray(r) for r in real], [jnp.asarray(f) for f in fake]))
    g = float(ns_g_loss([jnp.asarray(f) for f in fake]))
    np.testing.assert_allclose(d, d_ref, rtol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5)
    np.testing.assert_allclose(float(mean_logit([jnp.asarray(f) for f in fake])), np.mean([f.mean() for f in fake]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # Per-map means: a location-weighted mean (all maps pooled) would be a different number.
    pooled = np.concatenate([softplus(-f).ravel() for f in fake]).mean()
    assert abs(g_ref - pooled) > 1e-2

    # Textbook forms: −log σ(D(real)) − log(1 − σ(D(fake))) on a single map.
    r, f = np.float32([[0.3, -1.2]]), np.float32([[2.0, -0.5]])
    sig = lambda v: 1 / (1 + np.exp(-v.astype(np.float64)))
    np.testing.assert_allclose(float(ns_d_loss([r], [f])), np.mean(-np.log(sig(r))) + np.mean(-np.log(1 - sig(f))),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(float(ns_g_loss([f])), np.mean(-np.log(sig(f))), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Mix-and-match.


def test_mix_and_match_row_plan():
    np.testing.assert_array_equal(mix_and_match_rows(8, 0.25, ("noise", "text", "both")), [0] * 6 + [1, 2])
    np.testing.assert_array_equal(mix_and_match_rows(8, 0.5, ("noise", "text", "both")), [0] * 4 + [1, 2, 3, 1])
    np.testing.assert_array_equal(mix_and_match_rows(10, 0.5, ("both",)), [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(mix_and_match_rows(6, 0.5, ("text", "noise")), [0, 0, 0, 1, 2, 1])
    np.testing.assert_array_equal(mix_and_match_rows(8, 0.0, ("noise",)), [0] * 8)
    np.testing.assert_array_equal(mix_and_match_rows(8, 0.5, ()), [0] * 8)
    assert mix_and_match_rows(8, 0.25, ("noise",)).dtype == np.int32
    with pytest.raises(ValueError, match=r"config\.disc\.mix_match_types"):
        mix_and_match_rows(8, 0.25, ("noise", "prompt"))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"config\.disc\.mix_match_fraction"):
            mix_and_match_rows(8, bad, ("noise",))
    # Rounds half up (not Python's half-to-even) and always leaves a generated row in D's fake batch.
    np.testing.assert_array_equal(mix_and_match_rows(2, 0.25, ("noise",)), [0, 1])
    np.testing.assert_array_equal(mix_and_match_rows(4, 0.625, ("noise",)), [0, 1, 1, 1])
    for batch, frac in ((4, 0.9), (2, 0.75)):
        with pytest.raises(ValueError, match=r"config\.disc\.mix_match_fraction.*no generated sample"):
            mix_and_match_rows(batch, frac, ("noise",))


@pytest.mark.parametrize("with_pooled", [False, True])
def test_mix_and_match_builds_mismatched_pairs(with_pooled):
    b = 5
    types = ("noise", "text", "both")
    plan = np.array([0, 0, 1, 2, 3], np.int32)  # rows 2: noise, 3: text, 4: both
    row = lambda base, *s: jnp.asarray(base + np.arange(b, dtype=np.float32).reshape(b, *([1] * len(s))) +
                                       np.zeros((b, *s), np.float32))  # fmt: skip
    fake, real, z = row(100, 2, 2, 4), row(200, 2, 2, 4), row(300, 2, 2, 4)
    cond = {"context": row(400, 3, 6), "pooled": row(500, 7) if with_pooled else None}
    x2, z2, c2 = mix_and_match(plan, types, fake, real, z, cond)
    x2, z2, ctx2 = np.asarray(x2), np.asarray(z2), np.asarray(c2["context"])
    assert set(c2) == set(cond)
    first = lambda a, r: float(a[r].ravel()[0])
    nxt = lambda r: (r + 1) % b

    for r in range(b):
        assert np.all(x2[r] == x2[r].ravel()[0]) and np.all(z2[r] == z2[r].ravel()[0])
    # Rows 0, 1: untouched generated rows with their own z and text.
    for r in (0, 1):
        assert first(x2, r) == 100 + r and first(z2, r) == 300 + r and first(ctx2, r) == 400 + r
    # Every replaced row shows its own real latent.
    for r in (2, 3, 4):
        assert first(x2, r) == 200 + r
    assert first(z2, 2) == 300 + nxt(2) and first(ctx2, 2) == 400 + 2  # noise: next z, own text
    assert first(z2, 3) == 300 + 3 and first(ctx2, 3) == 400 + nxt(3)  # text: own z, next text
    assert first(z2, 4) == 300 + nxt(4) and first(ctx2, 4) == 400 + nxt(4)  # both (wraps to row 0)
    if with_pooled:
        pooled2 = np.asarray(c2["pooled"])
        assert [first(pooled2, r) for r in range(b)] == [500, 501, 502, 504, 500]  # follows the context
    else:
        assert c2["pooled"] is None

    # No replaced row: everything passes through.
    x0, z0, c0 = mix_and_match(np.zeros(b, np.int32), types, fake, real, z, cond)
    assert x0 is fake and z0 is z and c0 is cond


# ----------------------------------------------------------------------------------------------------------
# One stage-2 step on the tiny pipeline (one compilation).








@pytest.fixture(scope="module")
def text_encoder(tiny_pipeline):
    return TextEncoder.from_pipeline(tiny_pipeline)


@pytest.fixture(scope="module")
def stage2(tiny_pipeline, teacher, text_encoder):
    config = stage2_config()
    unet, variables = teacher
    t, dc = stage2_train_config(config), config.disc
    gen = Generator(unet, DDIMSchedule.from_pipeline(tiny_pipeline), _vae_scale_factor(tiny_pipeline))
    disc = Discriminator(unet, z_cond=dc.z_cond, multiscale_in=dc.multiscale_in, multiscale_out=dc.multiscale_out)
    loss_fn, loss_vars = load_distill_loss(config, tiny_pipeline)
    gp = jax.tree.map(jnp.asarray, variables["params"])
    dp = jax.tree.map(jnp.asarray, init_disc_params(disc, variables["params"], seed=0))
    state, opt = make_state(gp, dp, t, dc)
    step = make_stage2_step(gen, disc, text_encoder, loss_fn, t, dc, *opt, distill_weight=float(config.loss.weight),
                            gan_weight=float(config.stage2.gan_weight))  # fmt: skip
    frozen = {"text": text_encoder.params, "loss": loss_vars}
    frozen_before = jax.device_get(frozen)
    new, metrics = jax.device_get(jax.jit(step)(state, frozen, make_batch(text_encoder, int(t.batch_size))))
    return dict(state=state, frozen=frozen, frozen_before=frozen_before, new=new, metrics=metrics)


def _unchanged(old, new) -> list[str]:
    flat_old, flat_new = traverse_util.flatten_dict(jax.device_get(old)), traverse_util.flatten_dict(new)
    assert flat_old.keys() == flat_new.keys()
    return sorted("/".join(k) for k in flat_old if np.array_equal(flat_old[k], flat_new[k]))


def test_stage2_step_updates_every_g_and_d_parameter(stage2):
    state, new, metrics = stage2["state"], stage2["new"], stage2["metrics"]
    for k in ("loss", "grad_norm", "distill", "gan_g", "mse", "d_loss", "d_grad_norm", "d_real", "d_fake", "r1"):
        assert np.isfinite(metrics[k]), k
    assert bool(metrics["finite"]) and int(new.step) == 1
    assert float(metrics["r1_applied"]) == 1.0 and float(metrics["r1"]) > 0  # step 0: R1 is due
    assert float(metrics["grad_norm"]) > 0 and float(metrics["d_grad_norm"]) > 0

    assert _unchanged(state.params, new.params) == []
    assert _unchanged(state.disc, new.disc) == []  # the zero-initialised z_conv / input_proj_0 and the read-outs too
    assert {"z_conv", "input_proj_0", "readout_skip_0", "readout_up_1", "readout_out_1"} <= set(new.disc)

    # Frozen variables are inputs, not state: the state holds G (+ EMA, Adam) and D (+ Adam) and nothing else,
    # and the frozen trees come out untouched.
    n_g, n_d = len(jax.tree.leaves(state.params)), len(jax.tree.leaves(state.disc))
    n_gopt, n_dopt = len(jax.tree.leaves(new.opt_state)), len(jax.tree.leaves(new.disc_opt))
    assert jax.tree.structure(new.params) == jax.tree.structure(state.params)
    assert jax.tree.structure(new.disc) == jax.tree.structure(state.disc)
    assert 2 * n_g <= n_gopt <= 2 * n_g + 4 and 2 * n_d <= n_dopt <= 2 * n_d + 4  # Adam's mu, nu (+ counts)
    assert len(jax.tree.leaves(new)) == 2 + 2 * n_g + n_gopt + n_d + n_dopt  # step, rng, params, ema, ...
    assert len(jax.tree.leaves(stage2["frozen"]["text"])) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(stage2["frozen"]), stage2["frozen_before"])


# ----------------------------------------------------------------------------------------------------------
# Gradient flow through the step, differentiated with jax.grad. The step's wiring (detached fakes, stop_gradient
# on the conditioning) does not depend on what G and D are, so toy G / D modules keep these traces cheap; the text
# encoder is the real (tiny) one.






def test_stage2_gradients_detach_fakes_and_conditioning(tiny_pipeline, text_encoder):
    config = stage2_config()
    t, dc = stage2_train_config(config), config.disc
    gen = ToyGenerator(None, DDIMSchedule.from_pipeline(tiny_pipeline))
    disc = ToyDisc()
    batch = make_batch(text_encoder, int(t.batch_size))
    rng = np.random.default_rng(7)
    gp = {"a": jnp.float32(0.7), "w": jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)}
    shapes = jax.eval_shape(disc.init, jax.random.PRNGKey(1), batch["noise"], batch["noise"],
                            jnp.zeros((4,), jnp.int32), jnp.zeros((4, 77, 32)))["params"]  # fmt: skip
    dp = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), shapes)
    state, opt = make_state(gp, dp, t, dc)
    loss_fn, loss_vars = load_distill_loss(config, tiny_pipeline)
    step = make_stage2_step(gen, disc, text_encoder, loss_fn, t, dc, *opt, distill_weight=1.0, gan_weight=0.25)
    frozen = {"text": text_encoder.params, "loss": loss_vars}

    def metric(name, gp, dp, tp):
        return step(state.replace(params=gp, disc=dp), {**frozen, "text": tp}, batch)[1][name]

    @jax.jit
    def grads(gp, dp, tp):
        d_loss = jax.value_and_grad(functools.partial(metric, "d_loss"), (0, 1, 2))(gp, dp, tp)
        loss = jax.value_and_grad(functools.partial(metric, "loss"), 2)(gp, dp, tp)
        gan_g = jax.grad(functools.partial(metric, "gan_g"), 0)(gp, dp, tp)
        return d_loss, loss, gan_g

    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))
    (d_loss, (d_g, d_d, d_text)), (loss, loss_text), gan_g = jax.device_get(grads(gp, dp, frozen["text"]))
    assert len(jax.tree.leaves(loss_text)) == len(jax.tree.leaves(frozen["text"])) > 0
    assert norm(d_g) == 0.0  # D's fake batch is detached from G
    assert norm(loss_text) == 0.0 and norm(d_text) == 0.0  # the conditioning is frozen for G and D
    # The controls: D's loss reaches D, and G's GAN loss reaches G through D (simultaneous update).
    assert norm(d_d) > 1e-4 and norm(gan_g) > 1e-4

    # Detached, not disconnected: the values do depend on G's params and on the text encoder.
    bump = lambda tree: jax.tree.map(lambda a: a * 1.1 + 0.01, tree)
    d_loss_g = jax.device_get(grads(bump(gp), dp, frozen["text"]))[0][0]
    loss_t = jax.device_get(grads(gp, dp, bump(frozen["text"])))[1][0]
    assert abs(float(d_loss_g) - float(d_loss)) > 1e-6
    assert abs(float(loss_t) - float(loss)) > 1e-6
