"""The fidelity-study config fields: each computes what its comment in configs/base.py says.

* `loss.kind="pseudo_huber"` (`pseudo_huber`, `huber_c`, `load_distill_loss`) against the numpy formula;
* `loss.star_reduce`: E-LatentLPIPS* as the sum (twice the mean) of the augmented and the plain distance, the L1
  term added once, through `e_latent_lpips` and `load_distill_loss`;
* `train.lr_reading` (`read_lr`): the schedules it yields, read from `optimizer_from_config`'s lr_fn, and the
  trainers' `stage_config` hooks that apply it;
* `disc.r1_scope` / `disc.r1_groups` (`r1_rows`, and the R1 rows the stage-2 step really uses);
* `stage2.update_order`: "alternating" updates G exactly as "simultaneous" and D on the updated G's fakes;
* `stage2.ema_restart`: the stage-2 initial EMA on a real tiny run (stage 1, then the stage-2 trainer's state);
* `validate`: each new field's rule names the field; `pipeline.pairs_seed` (+ `run_pairs` uses it).
"""

import dataclasses
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stage2_toys import ToyDisc, ToyGenerator, make_batch, make_state, stage2_config

from configs import tiny as tiny_config
from d2g_jax import pipeline
from d2g_jax.losses.elatentlpips import e_latent_lpips, random_latent_lpips
from d2g_jax.models.text import TextEncoder
from d2g_jax.models.tiny import TINY_UNET, write_tiny_pipeline
from d2g_jax.sampling import DDIMSchedule
from d2g_jax.train.distill import huber_c, load_distill_loss, pseudo_huber
from d2g_jax.train.optim import optimizer_from_config, read_lr
from d2g_jax.train.stage2 import make_stage2_step, r1_rows, stage2_train_config
from d2g_jax.validate import ConfigError, validate

NO_TEACHER = "/nonexistent/teacher"  # loss kinds that read no teacher file


def _np_pseudo_huber(x, y, c):
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return np.sqrt(np.sum(d**2, axis=tuple(range(1, d.ndim))) + c * c) - c


# ----------------------------------------------------------------------------------------------------------
# 1. Pseudo-Huber.


def test_pseudo_huber_matches_numpy_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    y = x + rng.standard_normal(x.shape).astype(np.float32) * np.float32([0.001, 0.1, 2.0])[:, None, None, None]
    for c in (0.05, 1.0, 3.0):
        got = np.asarray(pseudo_huber(jnp.asarray(x), jnp.asarray(y), c))
        assert got.shape == (3,)
        np.testing.assert_allclose(got, _np_pseudo_huber(x, y, c), rtol=1e-5, atol=1e-7)
    # c omitted: Song & Dhariwal's 0.00054·√d with d = 4·5·2 elements per sample.
    c0 = 0.00054 * math.sqrt(40)
    np.testing.assert_allclose(np.asarray(pseudo_huber(jnp.asarray(x), jnp.asarray(y))), _np_pseudo_huber(x, y, c0),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    # Identical inputs: 0; a 3-D input: the norm is over its two non-batch axes.
    np.testing.assert_allclose(np.asarray(pseudo_huber(jnp.asarray(x), jnp.asarray(x), 0.7)), 0.0, atol=1e-7)
    x3, y3 = x[:, :, :, 0], y[:, :, :, 0]
    np.testing.assert_allclose(np.asarray(pseudo_huber(jnp.asarray(x3), jnp.asarray(y3), 0.2)),
                               _np_pseudo_huber(x3, y3, 0.2), rtol=1e-5, atol=1e-7)  # fmt: skip


def test_huber_c_default_and_explicit():
    for d in (1, 256, 4096, 16384):
        assert huber_c(0, d) == pytest.approx(0.00054 * math.sqrt(d), rel=1e-12)
        assert huber_c(0.0, d) == pytest.approx(0.00054 * math.sqrt(d), rel=1e-12)
        assert huber_c(0.25, d) == 0.25
        assert huber_c(3, d) == 3.0
    assert huber_c(0, 16384) == pytest.approx(0.06912, rel=1e-9)  # SD's 64×64×4 latents


@pytest.mark.parametrize("config_c", [0.0, 0.5])
def test_load_distill_loss_pseudo_huber(config_c):
    config = tiny_config.get_config()
    config.loss.kind = "pseudo_huber"
    config.loss.huber_c = config_c
    loss_fn, variables = load_distill_loss(config, NO_TEACHER)  # this kind reads no teacher file
    assert variables == {}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    y = x + (0.01 * rng.standard_normal(x.shape)).astype(np.float32)
    c = config_c if config_c > 0 else 0.00054 * math.sqrt(8 * 8 * 4)
    got = np.asarray(jax.jit(loss_fn)(variables, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0)))
    assert got.shape == (4,)
    np.testing.assert_allclose(got, _np_pseudo_huber(x, y, c), rtol=1e-5, atol=1e-7)
    # Not the mse kind under another name (and c matters here: ‖x − y‖ ≈ 0.16 is comparable with c).
    assert not np.allclose(got, np.mean((x - y) ** 2, axis=(1, 2, 3)), rtol=1e-2)
    other = 0.5 if config_c == 0 else 0.00054 * math.sqrt(256)
    assert np.abs(got - _np_pseudo_huber(x, y, other)).max() > 1e-3


def test_load_distill_loss_pseudo_huber_refuses_negative_c():
    config = tiny_config.get_config()
    config.loss.kind = "pseudo_huber"
    config.loss.huber_c = -1.0
    with pytest.raises(ValueError, match=r"config\.loss\.huber_c=-1"):
        load_distill_loss(config, NO_TEACHER)


# ----------------------------------------------------------------------------------------------------------
# 2. E-LatentLPIPS* star_reduce.


@pytest.fixture(scope="module")
def lpips_vars():
    return random_latent_lpips("sd15", 3)


def _latents(seed=5, b=3, side=16):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((b, side, side, 4)).astype(np.float32)
    x1 = (x0 + 0.7 * rng.standard_normal(x0.shape)).astype(np.float32)
    return jnp.asarray(x0), jnp.asarray(x1)


def test_star_sum_is_twice_the_mean_with_l1_added_once(lpips_vars):
    x0, x1 = _latents(b=3, side=8)
    key = jax.random.PRNGKey(11)
    l1 = np.mean(np.abs(np.asarray(x0) - np.asarray(x1)), axis=(1, 2, 3))

    def dist(**kw):  # (distance [B], per-layer distances [B, 5]) on one augmentation draw
        d, layers = e_latent_lpips(lpips_vars, x0, x1, key, preset="bgco", return_layers=True, **kw)
        return np.asarray(d, np.float64), np.asarray(layers, np.float64)

    mean, layers_m = dist(mode="star")  # "mean" is the default
    summ, layers_s = dist(mode="star", star_reduce="sum")
    assert np.all(mean - l1 > 1e-3)  # the 2× below is not a comparison of zeros
    np.testing.assert_allclose(summ - l1, 2 * (mean - l1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers_s, 2 * layers_m, rtol=1e-5, atol=1e-7)  # per layer too
    # The L1 term once in either: sum = plain + ensemble (each without L1) + L1, on the same augmentation draw.
    plain = dist(mode="plain")[1].sum(-1)
    ens = dist(mode="ensemble")[1].sum(-1)
    assert np.abs(plain - ens).max() > 1e-3
    np.testing.assert_allclose(summ, plain + ens + l1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, (plain + ens) / 2 + l1, rtol=1e-5, atol=1e-6)
    # Without the L1 term: exactly twice.
    no_l1 = lambda r: np.asarray(e_latent_lpips(lpips_vars, x0, x1, key, preset="bgco", mode="star", l1=False,
                                                star_reduce=r))  # fmt: skip
    np.testing.assert_allclose(no_l1("sum"), 2 * no_l1("mean"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(no_l1("sum"), plain + ens, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="star_reduce"):
        e_latent_lpips(lpips_vars, x0, x1, key, mode="star", star_reduce="max")


def test_load_distill_loss_passes_star_reduce(lpips_vars):
    config = tiny_config.get_config()
    assert config.loss.kind == "e_latent_lpips_star" and config.loss.random_weights
    x0, x1 = _latents(seed=8, side=8, b=2)
    key = jax.random.PRNGKey(2)
    out = {}
    for reduce in ("mean", "sum"):
        config.loss.star_reduce = reduce
        loss_fn, variables = load_distill_loss(config, NO_TEACHER)
        out[reduce] = np.asarray(loss_fn(variables, x0, x1, key), np.float64)
        ref = e_latent_lpips(variables, x0, x1, key, preset=config.loss.augment, l1=bool(config.loss.l1),
                             encoder=config.loss.encoder, mode="star", star_reduce=reduce)  # fmt: skip
        np.testing.assert_allclose(out[reduce], np.asarray(ref), rtol=1e-6, atol=1e-7)
    l1 = np.mean(np.abs(np.asarray(x0) - np.asarray(x1)), axis=(1, 2, 3))
    np.testing.assert_allclose(out["sum"] - l1, 2 * (out["mean"] - l1), rtol=1e-5, atol=1e-6)
    config.loss.star_reduce = "max"
    with pytest.raises(ValueError, match=r"config\.loss\.star_reduce='max'"):
        load_distill_loss(config, NO_TEACHER)


# ----------------------------------------------------------------------------------------------------------
# 3. train.lr_reading.


def _lrs(t, steps=(0, 1, 17, 30, 59, 60)):
    params = {"w": jnp.zeros((2,))}
    _, lr_fn = optimizer_from_config(params, t, int(t.num_steps))
    return np.array([float(lr_fn(s)) for s in steps])


def _lr_config():
    c = tiny_config.get_config()
    c.train.lr, c.train.lr_end, c.train.num_steps, c.train.lr_schedule = 4e-4, 3e-5, 60, "cosine"
    c.stage2.lr, c.stage2.lr_end, c.stage2.num_steps = 2e-4, 1e-5, 60
    assert c.train.warmup_steps == 0
    return c


def test_read_lr_per_stage_leaves_the_fields():
    c = _lr_config()
    assert read_lr(c.train, "per_stage", "stage1") is c.train
    t2 = stage2_train_config(c)
    assert read_lr(t2, "per_stage", "stage2") is t2
    lrs = _lrs(read_lr(c.train, "per_stage", "stage1"))
    assert lrs[0] == pytest.approx(4e-4) and lrs[-1] == pytest.approx(3e-5)  # a decay within the stage
    lrs2 = _lrs(read_lr(t2, "per_stage", "stage2"))
    assert lrs2[0] == pytest.approx(2e-4) and lrs2[-1] == pytest.approx(1e-5)


def test_read_lr_stage_switch_constant_per_stage():
    c = _lr_config()
    before = c.train.to_dict()
    t1 = read_lr(c.train, "stage_switch", "stage1")
    assert c.train.to_dict() == before  # the config is not modified
    assert (t1.lr, t1.lr_end, t1.lr_schedule) == (4e-4, 4e-4, "constant")
    np.testing.assert_allclose(_lrs(t1), 4e-4, rtol=1e-6)  # stage 1 at train.lr throughout

    t2_in = stage2_train_config(c)
    t2 = read_lr(t2_in, "stage_switch", "stage2")
    assert (t2_in.lr, t2_in.lr_end) == (2e-4, 1e-5)  # not modified either
    assert (t2.lr, t2.lr_end, t2.lr_schedule) == (1e-5, 1e-5, "constant")
    np.testing.assert_allclose(_lrs(t2), 1e-5, rtol=1e-6)  # stage 2 at stage2.lr_end throughout
    assert t2.num_steps == 60 and t2.batch_size == c.stage2.batch_size  # the other stage-2 fields stay


def test_trainers_stage_config_apply_lr_reading():
    from d2g_jax.train.stage2_trainer import Stage2Trainer
    from d2g_jax.train.trainer import Trainer

    c = _lr_config()
    c.train.lr_reading = "stage_switch"
    fake = types.SimpleNamespace(config=c)
    np.testing.assert_allclose(_lrs(Trainer.stage_config(fake)), 4e-4, rtol=1e-6)
    np.testing.assert_allclose(_lrs(Stage2Trainer.stage_config(fake)), 1e-5, rtol=1e-6)
    c.train.lr_reading = "per_stage"
    assert _lrs(Trainer.stage_config(fake))[-1] == pytest.approx(3e-5)
    lrs2 = _lrs(Stage2Trainer.stage_config(fake))
    assert lrs2[0] == pytest.approx(2e-4) and lrs2[-1] == pytest.approx(1e-5)


def test_read_lr_unknown_reading():
    c = _lr_config()
    with pytest.raises(ValueError, match=r"config\.train\.lr_reading='per_step'"):
        read_lr(c.train, "per_step", "stage1")
    c.train.lr_reading = "bogus"
    from d2g_jax.train.trainer import Trainer

    with pytest.raises(ValueError, match=r"config\.train\.lr_reading='bogus'"):
        Trainer.stage_config(types.SimpleNamespace(config=c))


# ----------------------------------------------------------------------------------------------------------
# 4. R1 rows.


def test_r1_rows():
    np.testing.assert_array_equal(r1_rows(8, 1, "batch", 0), [0])
    np.testing.assert_array_equal(r1_rows(8, 3, "batch", 4), [0, 1, 2])  # groups only count for "device"
    np.testing.assert_array_equal(r1_rows(8, 8, "batch", 0), np.arange(8))
    np.testing.assert_array_equal(r1_rows(8, 1, "device", 4), [0, 2, 4, 6])
    np.testing.assert_array_equal(r1_rows(8, 2, "device", 2), [0, 1, 4, 5])
    np.testing.assert_array_equal(r1_rows(6, 1, "device", 3), [0, 2, 4])
    np.testing.assert_array_equal(r1_rows(12, 2, "device", 3), [0, 1, 4, 5, 8, 9])
    np.testing.assert_array_equal(r1_rows(8, 1, "device", 1), [0])
    np.testing.assert_array_equal(r1_rows(8, 1, "device", 8), np.arange(8))

    with pytest.raises(ValueError, match=r"config\.disc\.r1_scope='global'"):
        r1_rows(8, 1, "global", 2)
    with pytest.raises(ValueError, match=r"config\.disc\.r1_groups=3"):
        r1_rows(8, 1, "device", 3)  # 8 rows do not split into 3 slices
    with pytest.raises(ValueError, match=r"config\.disc\.r1_groups=0"):
        r1_rows(8, 1, "device", 0)
    with pytest.raises(ValueError, match=r"config\.disc\.r1_samples=3"):
        r1_rows(8, 3, "device", 4)  # 2 rows per slice
    with pytest.raises(ValueError, match=r"config\.disc\.r1_samples=5"):
        r1_rows(4, 5, "batch", 0)


# ----------------------------------------------------------------------------------------------------------
# 5. stage2.update_order on the toy G / D of tests/train/discriminator_test.py (the real text encoder).

SMALL_UNET = dataclasses.replace(TINY_UNET, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_tiny_pipeline(str(tmp_path_factory.mktemp("fidelity") / "pipe"), seed=5, unet=SMALL_UNET,
                               text_layers=1)  # fmt: skip


@pytest.fixture(scope="module")
def text_encoder(tiny_pipeline):
    return TextEncoder.from_pipeline(tiny_pipeline)












@pytest.fixture(scope="module")
def toy(tiny_pipeline, text_encoder):
    """`run(update, state=None, **disc_overrides) → (new state, metrics)` of the toy stage-2 step (jitted)."""
    config = stage2_config()
    t = stage2_train_config(config)
    gen = ToyGenerator(None, DDIMSchedule.from_pipeline(tiny_pipeline))
    disc = ToyDisc()
    batch = make_batch(text_encoder, int(t.batch_size))
    rng = np.random.default_rng(7)
    gp = {"a": jnp.float32(0.7), "w": jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)}
    shapes = jax.eval_shape(disc.init, jax.random.PRNGKey(1), batch["noise"], batch["noise"],
                            jnp.zeros((4,), jnp.int32), jnp.zeros((4, 77, 32)))["params"]  # fmt: skip
    dp = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), shapes)
    state0, _ = make_state(gp, dp, t, config.disc)
    loss_fn, loss_vars = load_distill_loss(config, tiny_pipeline)
    frozen = {"text": text_encoder.params, "loss": loss_vars}

    def make(update, **disc_overrides):
        dc = config.disc.copy_and_resolve_references()
        for k, v in disc_overrides.items():
            dc[k] = v
        _, opt = make_state(gp, dp, t, dc)
        return make_stage2_step(gen, disc, text_encoder, loss_fn, t, dc, *opt, distill_weight=1.0, gan_weight=0.25,
                                update=update)  # fmt: skip

    def run(update, state=None, batch_=None, **disc_overrides):
        step = make(update, **disc_overrides)
        out = jax.jit(step)(state0 if state is None else state, frozen, batch if batch_ is None else batch_)
        return jax.device_get(out)

    return types.SimpleNamespace(run=run, make=make, state=state0, batch=batch, config=config, t=t, gen=gen, disc=disc,
                                 text=text_encoder, loss_fn=loss_fn, frozen=frozen, gp=gp, dp=dp)  # fmt: skip


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_trees_close(a, b, **tol):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], err_msg=k, **tol)


def _max_diff(a, b):
    fa, fb = _flat(a), _flat(b)
    return max(float(np.abs(np.asarray(fa[k]) - np.asarray(fb[k])).max()) for k in fa)


def test_alternating_updates_g_as_simultaneous_and_d_on_the_updated_g(toy):
    sim, m_sim = toy.run("simultaneous")
    alt, m_alt = toy.run("alternating")
    for m in (m_sim, m_alt):
        assert bool(m["finite"]) and float(m["r1_applied"]) == 1.0 and float(m["r1"]) > 0  # R1 due at step 0
    assert _max_diff(toy.state.params, alt.params) > 1e-4  # G moved

    # (a) G's update is the same: its GAN gradient goes through D before this step's D update in both modes.
    _assert_trees_close(alt.params, sim.params, rtol=1e-6, atol=1e-8)
    _assert_trees_close(alt.ema, sim.ema, rtol=1e-6, atol=1e-8)
    _assert_trees_close(alt.opt_state, sim.opt_state, rtol=1e-6, atol=1e-8)
    for k in ("loss", "gan_g", "distill", "grad_norm", "r1"):
        np.testing.assert_allclose(m_alt[k], m_sim[k], rtol=1e-6, err_msg=k)

    # (b) D's update differs: it saw another G's fakes.
    assert _max_diff(alt.disc, sim.disc) > 1e-6
    assert abs(float(m_alt["d_fake"]) - float(m_sim["d_fake"])) > 1e-6

    # (c) D depends on G only through its fakes: alternating's D = simultaneous's D from the updated G.
    ref, m_ref = toy.run("simultaneous", state=toy.state.replace(params=alt.params))
    _assert_trees_close(alt.disc, ref.disc, rtol=1e-5, atol=1e-6)
    _assert_trees_close(alt.disc_opt, ref.disc_opt, rtol=1e-5, atol=1e-6)
    for k in ("d_loss", "d_real", "d_fake", "d_grad_norm", "r1"):
        np.testing.assert_allclose(m_alt[k], m_ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(alt.step) == int(sim.step) == 1


def test_unknown_update_refused(toy):
    with pytest.raises(ValueError, match=r"config\.stage2\.update_order='bogus'"):
        toy.make("bogus")


def test_r1_per_device_slice_rows(toy):
    """r1_scope="device", 2 groups on a batch of 4: R1 on rows 0 and 2 — the same penalty as batch-scoped R1 on the
    first 2 rows of the batch reordered [0, 2, 1, 3]; another penalty than R1 on row 0 alone."""
    new, m = toy.run("alternating", r1_scope="device", r1_groups=2)
    for k in ("loss", "grad_norm", "distill", "gan_g", "d_loss", "d_grad_norm", "d_real", "d_fake", "r1"):
        assert np.isfinite(m[k]), k
    assert bool(m["finite"]) and float(m["r1_applied"]) == 1.0 and float(m["r1"]) > 0
    assert _max_diff(toy.state.disc, new.disc) > 1e-6

    perm = np.array([0, 2, 1, 3])
    permuted = jax.tree.map(lambda a: a[perm], toy.batch)
    _, m_perm = toy.run("alternating", batch_=permuted, r1_samples=2)
    np.testing.assert_allclose(m["r1"], m_perm["r1"], rtol=1e-5)
    _, m_row0 = toy.run("alternating")
    assert abs(float(m["r1"]) - float(m_row0["r1"])) > 1e-4 * abs(float(m_row0["r1"]))

    with pytest.raises(ValueError, match=r"config\.disc\.r1_groups=3"):
        toy.make("simultaneous", r1_scope="device", r1_groups=3)
    with pytest.raises(ValueError, match=r"config\.disc\.r1_scope='slice'"):
        toy.make("simultaneous", r1_scope="slice")


def test_stage2_trainer_step_reads_update_and_r1_groups(toy):
    """Stage2Trainer.build_step hands config.stage2.update_order and the mesh's device count (disc.r1_groups=0) to the
    step: with a 2-device mesh, update="alternating" and r1_scope="device" its step is the toy step built with
    those values (a config field named `update` must be read as the field, not ConfigDict.update)."""
    from d2g_jax.train.stage2_trainer import Stage2Trainer

    c = toy.config.copy_and_resolve_references()
    c.stage2.update_order = "alternating"
    c.disc.r1_scope, c.disc.r1_groups = "device", 0
    tx, lr_fn, dtx, dlr_fn = make_state(toy.gp, toy.dp, toy.t, c.disc)[1]
    fake = types.SimpleNamespace(config=c, gen=toy.gen, disc=toy.disc, text=toy.text, loss_fn=toy.loss_fn, t=toy.t,
                                 tx=tx, lr_fn=lr_fn, dtx=dtx, dlr_fn=dlr_fn,
                                 mesh=types.SimpleNamespace(devices=np.empty((2, 1), object)))  # fmt: skip
    step = Stage2Trainer.build_step(fake)
    new, m = jax.device_get(jax.jit(step)(toy.state, toy.frozen, toy.batch))
    ref, m_ref = toy.run("alternating", r1_scope="device", r1_groups=2)
    _assert_trees_close(new.disc, ref.disc, rtol=1e-6, atol=1e-8)
    _assert_trees_close(new.params, ref.params, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m["r1"], m_ref["r1"], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 6. stage2.ema_restart on a real tiny run, 8. pairs.seed through run_pairs.


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """Tiny pairs (pairs.seed=5, config.seed=0) and 2 stage-1 steps with an EMA that lags the weights."""
    base = str(tmp_path_factory.mktemp("ema_restart"))
    c = tiny_config.get_config()
    c.pairs.num_pairs = 16  # 8 train + 8 held out
    c.pairs.seed = 5
    manifest = pipeline.run_pairs(c, base)
    c.teacher.tiny, c.teacher.path = False, os.path.join(base, "tiny_teacher")
    c.pairs.dir = os.path.join(base, "pairs")
    c.loss.kind = "mse"  # the cheapest step: the EMA is what is tested
    t = c.train
    t.num_steps, t.ckpt_every, t.log_every, t.eval_every, t.sample_every = 2, 2, 1, 0, 0
    t.lr = t.lr_end = 1e-2
    t.ema_start, t.ema_beta = 0, 0.5
    c.stage2.num_steps = 2
    wd1 = os.path.join(base, "s1")
    state = jax.device_get(pipeline.make_trainer(c, wd1, "stage1").run())
    return types.SimpleNamespace(config=c, base=base, wd1=wd1, state=state, manifest=manifest)


@pytest.mark.slow  # the stage1_run fixture: pairs + a stage-1 compile, ~55-75 s on 2 shared cores
def test_pairs_seed_used_by_run_pairs(stage1_run):
    from d2g_jax.data.loader import PairsSource
    from d2g_jax.data.pairs_writer import pair_noise

    m = stage1_run.manifest
    assert stage1_run.config.seed == 0 and m["identity"]["seed"] == 5
    src = PairsSource(os.path.join(stage1_run.base, "pairs"))
    rec = src[3]
    expect = np.asarray(pair_noise(5, jnp.asarray([3], jnp.uint32), np.shape(rec["noise"])))[0]
    np.testing.assert_allclose(np.asarray(rec["noise"]), expect, rtol=1e-6, atol=1e-6)
    other = np.asarray(pair_noise(0, jnp.asarray([3], jnp.uint32), np.shape(rec["noise"])))[0]
    assert np.abs(other - expect).max() > 0.1  # config.seed's noise would differ


@pytest.mark.slow  # the stage1_run fixture (shared with the test above) + two stage-2 trainers
@pytest.mark.parametrize("restart", [True, False])
def test_stage2_ema_restart(stage1_run, tmp_path, restart):
    s1 = stage1_run.state
    assert int(s1.step) == 2
    assert _max_diff(s1.ema, s1.params) > 1e-5  # stage 1's EMA lags its weights
    c = stage1_run.config.copy_and_resolve_references()
    c.stage2.init_from = stage1_run.wd1
    c.stage2.ema_restart = restart
    c.stage2.ema_start = 3 if restart else 0
    trainer = pipeline.make_trainer(c, str(tmp_path / "s2"), "stage2")
    state = jax.device_get(trainer.initial_state())
    assert int(state.step) == 0
    _assert_trees_close(state.params, s1.params, rtol=0, atol=0)  # G starts from stage 1's weights
    if restart:
        _assert_trees_close(state.ema, state.params, rtol=0, atol=0)
    else:
        _assert_trees_close(state.ema, s1.ema, rtol=0, atol=0)
        assert _max_diff(state.ema, state.params) > 1e-5
    assert trainer.t.ema_start == c.stage2.ema_start  # the stage-2 EMA start the step uses


# ----------------------------------------------------------------------------------------------------------
# 7. validate, 8. pairs_seed.


def _tiny():
    c = tiny_config.get_config()
    c.pairs.num_pairs = 16
    return c


def _set(c, field, value):
    node = c
    *path, last = field.split(".")
    for k in path:
        node = node[k]
    node[last] = value


REFUSED = [
    ({"train.lr_reading": "x"}, "config.train.lr_reading='x'"),
    ({"loss.star_reduce": "x"}, "config.loss.star_reduce='x'"),
    ({"loss.huber_c": -1.0}, "config.loss.huber_c=-1"),
    ({"stage2.update_order": "x"}, "config.stage2.update_order='x'"),
    ({"stage2.ema_start": 5}, "config.stage2.ema_start=5 needs config.stage2.ema_restart=True"),
    ({"disc.r1_scope": "x"}, "config.disc.r1_scope='x'"),
    ({"disc.r1_groups": -1}, "config.disc.r1_groups=-1"),
    ({"disc.r1_scope": "device", "disc.r1_groups": 3}, "config.disc.r1_groups=3"),
    # r1_groups=0: one slice per device (8 here), 1 row each of stage 2's batch of 8.
    ({"disc.r1_scope": "device", "disc.r1_samples": 2}, "config.disc.r1_samples=2"),
    ({"pairs.seed": -2}, "config.pairs.seed=-2"),
    ({"report.enabled": True, "report.rows": "student,bogus"}, "config.report.rows='student,bogus'"),
    ({"report.enabled": True, "report.rows": " , "}, "config.report.rows="),
    ({"disc.r1_reduce": "x"}, "config.disc.r1_reduce='x'"),
    ({"disc.r1_offset": 16}, "config.disc.r1_offset=16"),
    ({"disc.r1_offset": -1}, "config.disc.r1_offset=-1"),
    ({"disc.eps_map": "x"}, "config.disc.eps_map='x'"),
    ({"disc.eps_map": "off", "disc.multiscale_out": False}, "config.disc.eps_map='off' needs"),
]

ACCEPTED = [
    {},
    {"train.lr_reading": "stage_switch"},
    {"loss.star_reduce": "sum"},
    {"loss.kind": "pseudo_huber", "loss.huber_c": 0.03},
    {"stage2.update_order": "alternating"},
    {"stage2.ema_start": 5, "stage2.ema_restart": True},
    {"stage2.ema_restart": True},
    {"disc.r1_scope": "device"},
    {"disc.r1_scope": "device", "disc.r1_groups": 4, "disc.r1_samples": 2},
    {"disc.r1_scope": "batch", "disc.r1_samples": 2},
    {"pairs.seed": 0},
    {"pairs.seed": -1},
    {"report.enabled": True, "report.rows": "student"},
    {"report.enabled": True, "report.rows": "real,teacher,teacher_x0,student"},
    {"report.enabled": False, "report.rows": "student,bogus"},  # no report phase: not checked
    {"disc.r1_reduce": "mean", "disc.r1_offset": 3},  # tiny: r1_interval 4
    {"disc.eps_map": "channel_mean"},
    {"disc.eps_map": "off"},
    {"disc.r1_gamma": 0.0, "disc.r1_offset": 99},  # no R1: the offset is not read
]


@pytest.mark.parametrize("overrides,needle", REFUSED, ids=lambda x: str(x)[:60])
def test_validate_refuses(tmp_path, overrides, needle):
    c = _tiny()
    for k, v in overrides.items():
        _set(c, k, v)
    with pytest.raises(ConfigError) as e:
        validate(c, str(tmp_path / "wd"))
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides", ACCEPTED, ids=lambda x: str(x)[:60])
def test_validate_accepts(tmp_path, overrides):
    c = _tiny()
    for k, v in overrides.items():
        _set(c, k, v)
    todo = validate(c, str(tmp_path / "wd"))
    assert "stage2" in todo
    assert ("report" in todo) == bool(c.report.enabled)


def test_pairs_seed():
    c = tiny_config.get_config()
    c.seed = 7
    assert c.pairs.seed == -1
    assert pipeline.pairs_seed(c) == 7
    c.pairs.seed = 0
    assert pipeline.pairs_seed(c) == 0
    c.pairs.seed = 3
    assert pipeline.pairs_seed(c) == 3
    c.seed = 0
    c.pairs.seed = -1
    assert pipeline.pairs_seed(c) == 0


# ----------------------------------------------------------------------------------------------------------
# 9. The D-probe fields (issue 20): R1's score reduction and schedule offset, the ε-map's read-out, G's gradient
# parts, D's accuracy, and the R1 penalty of a logging interval.


def test_r1_score_mean_is_the_sum_over_locations_divided():
    from d2g_jax.train.discriminator import r1_penalty, r1_score

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((1, 4, 4, 2)), jnp.float32)  # a linear "D": one map of 4·4·2 = 32 logits
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 2)), jnp.float32)
    s_sum = float(r1_score([w * x], "sum")[0])
    s_mean = float(r1_score([w * x], "mean")[0])
    np.testing.assert_allclose(s_sum, 32 * s_mean, rtol=1e-5)
    pen_sum = float(r1_penalty(lambda v: r1_score([w * v], "sum"), x))
    pen_mean = float(r1_penalty(lambda v: r1_score([w * v], "mean"), x))
    np.testing.assert_allclose(pen_sum, float(jnp.sum(w**2)), rtol=1e-5)  # ∇ = w
    np.testing.assert_allclose(pen_sum, 32**2 * pen_mean, rtol=1e-5)  # the L² of a map of L locations
    with pytest.raises(ValueError, match=r"config\.disc\.r1_reduce='max'"):
        r1_score([w], "max")


def test_readout_maps_eps_modes_and_image_scores():
    from d2g_jax.train.discriminator import image_scores, readout_maps

    rng = np.random.default_rng(1)
    eps = jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((3, 2, 2, 1)), jnp.float32)
    maps = (eps, head)
    assert readout_maps(maps, "elements")[0] is eps
    cm = readout_maps(maps, "channel_mean")
    assert cm[0].shape == (3, 4, 4, 1) and cm[1] is head
    np.testing.assert_allclose(np.asarray(cm[0])[..., 0], np.asarray(eps).mean(-1), rtol=1e-6)
    assert readout_maps(maps, "off") == (head,)
    with pytest.raises(ValueError, match="multiscale_out"):
        readout_maps((eps,), "off")
    with pytest.raises(ValueError, match=r"config\.disc\.eps_map='x'"):
        readout_maps(maps, "x")
    # an image's score: each map's mean logit, averaged over the maps (channel_mean leaves the ε-map's mean as is)
    want = 0.5 * (np.asarray(eps).mean((1, 2, 3)) + np.asarray(head).mean((1, 2, 3)))
    np.testing.assert_allclose(np.asarray(image_scores(maps)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(image_scores(cm)), want, rtol=1e-5)


@pytest.mark.parametrize("offset", [0, 1])
def test_r1_offset_picks_the_r1_steps(toy, offset):
    """R1 runs where step % r1_interval == r1_offset: with interval 2, offset 0 → steps 0, 2; offset 1 → step 1."""
    applied = []
    for s in range(3):
        _, m = toy.run("simultaneous", state=toy.state.replace(step=jnp.int32(s)), r1_interval=2, r1_offset=offset)
        applied.append(float(m["r1_applied"]))
        assert (float(m["r1"]) > 0) == (applied[-1] == 1.0)
    assert applied == ([1.0, 0.0, 1.0] if offset == 0 else [0.0, 1.0, 0.0])


def test_r1_reduce_and_eps_map_reach_the_step(toy):
    """r1_reduce="mean" shrinks the penalty (each map's score divided by its 64 / 16 locations); eps_map="off"
    drops the toy's first map (Dense_2, full resolution) from D's loss: with R1 off it gets no gradient at all and
    stays where it was (no weight decay), while the second map's head (Dense_3) moves."""
    _, m_sum = toy.run("simultaneous", r1_reduce="sum")
    _, m_mean = toy.run("simultaneous", r1_reduce="mean")
    assert 0 < float(m_mean["r1"]) < float(m_sum["r1"])
    new_off, m_off = toy.run("simultaneous", eps_map="off", r1_gamma=0.0)
    new_on, m_on = toy.run("simultaneous", r1_gamma=0.0)
    assert abs(float(m_off["d_loss"]) - float(m_on["d_loss"])) > 1e-6
    first, second = toy.state.disc["Dense_2"], toy.state.disc["Dense_3"]
    assert _max_diff(first, new_off.disc["Dense_2"]) == 0.0
    assert _max_diff(first, new_on.disc["Dense_2"]) > 1e-6
    assert _max_diff(second, new_off.disc["Dense_3"]) > 1e-6


def test_g_gradient_parts_and_d_accuracy(toy):
    """The step's G gradient is the sum of the distillation part and λ_GAN × the GAN part, pulled back through G
    separately: their norms are logged (g_grad_distill, g_grad_gan, their ratio) and agree with jax.grad of each
    term; d_acc is the per-image accuracy of D's training batch."""
    from d2g_jax.train.discriminator import ns_g_loss, readout_maps

    new, m = toy.run("simultaneous")
    st, b = toy.state, toy.batch
    cond = toy.text.embed(toy.frozen["text"], b["ids"], b["masks"])
    key = jax.random.split(jax.random.fold_in(st.rng, st.step), 3)[0]
    td = jnp.zeros((4,), jnp.int32)

    def distill(p):
        return jnp.mean(toy.loss_fn(toy.frozen["loss"], toy.gen(p, b["noise"], cond), b["latent"], key))

    def gan(p):
        maps = toy.disc.apply({"params": st.disc}, toy.gen(p, b["noise"], cond), b["noise"], td, cond["context"])
        return ns_g_loss(readout_maps(maps, "elements"))

    norm = lambda g: float(jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g))))
    gd, gg = jax.grad(distill)(st.params), jax.tree.map(lambda v: 0.25 * v, jax.grad(gan)(st.params))
    np.testing.assert_allclose(m["g_grad_distill"], norm(gd), rtol=1e-5)
    np.testing.assert_allclose(m["g_grad_gan"], norm(gg), rtol=1e-5)
    np.testing.assert_allclose(m["gan_grad_ratio"], norm(gg) / norm(gd), rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], norm(jax.tree.map(jnp.add, gd, gg)), rtol=1e-5)
    assert 0.0 <= float(m["d_acc"]) <= 1.0 and float(m["d_acc"]) * 8 == round(float(m["d_acc"]) * 8)
    # the control (λ_GAN = 0) logs no GAN gradient
    dc = toy.config.disc
    _, opt = make_state(toy.gp, toy.dp, toy.t, dc)
    step0 = make_stage2_step(toy.gen, toy.disc, toy.text, toy.loss_fn, toy.t, dc, *opt, distill_weight=1.0,
                             gan_weight=0.0)  # fmt: skip
    _, m0 = jax.device_get(jax.jit(step0)(st, toy.frozen, b))
    assert float(m0["g_grad_gan"]) == 0.0 and float(m0["gan_grad_ratio"]) == 0.0
    np.testing.assert_allclose(m0["grad_norm"], norm(gd), rtol=1e-5)


def test_g_gradient_parts_not_logged_is_the_same_update(toy):
    """config.stage2.log_grad_parts=False pulls G's summed gradient back once: the same update and gradient norm as
    the two parts pulled back apart (float rounding apart), and no part norms in the metrics."""
    dc = toy.config.disc
    _, opt = make_state(toy.gp, toy.dp, toy.t, dc)
    def make(parts):
        return jax.jit(make_stage2_step(toy.gen, toy.disc, toy.text, toy.loss_fn, toy.t, dc, *opt, distill_weight=1.0,
                                        gan_weight=0.25, log_grad_parts=parts))  # fmt: skip

    new_e, m_e = jax.device_get(make(True)(toy.state, toy.frozen, toy.batch))
    new_o, m_o = jax.device_get(make(False)(toy.state, toy.frozen, toy.batch))
    assert float(m_e["g_grad_gan"]) > 0
    _assert_trees_close(new_o.params, new_e.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m_o["grad_norm"], m_e["grad_norm"], rtol=1e-5)
    assert not {"g_grad_distill", "g_grad_gan", "gan_grad_ratio"} & set(m_o)
    assert set(m_e) - set(m_o) == {"g_grad_distill", "g_grad_gan", "gan_grad_ratio"}


@pytest.mark.slow  # the stage1_run fixture + a tiny stage-2 run (~1 min on 2 shared cores)
def test_stage2_logs_r1_over_the_interval_and_d_accuracy(stage1_run, tmp_path):
    """R1 every 2 steps from step 0 and a log every 2 steps: the logged rows are steps 2 and 4, neither an R1 step
    (their own r1 is 0), yet each row's r1_mean is the penalty of the interval's R1 step; eval rows carry D's
    held-out accuracy and every read-out map's mean logits."""
    import json

    c = stage1_run.config.copy_and_resolve_references()
    c.stage2.init_from = stage1_run.wd1
    c.stage2.num_steps, c.stage2.log_every, c.stage2.eval_every = 4, 2, 4
    c.stage2.ckpt_every, c.stage2.sample_every = 4, 0
    c.disc.r1_interval = 2
    wd2 = str(tmp_path / "s2")
    pipeline.make_trainer(c, wd2, "stage2").run()
    rows = [json.loads(ln) for ln in open(os.path.join(wd2, "stage2", "metrics.jsonl"))]
    train = [r for r in rows if "r1_applied" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert r["r1_applied"] == 0.0 and r["r1"] == 0.0
        assert r["r1_steps"] == 1.0 and r["r1_mean"] > 0
        for k in ("d_acc", "g_grad_distill", "g_grad_gan", "gan_grad_ratio"):
            assert np.isfinite(r[k]), k
    d_rows = [r for r in rows if "eval/d_acc" in r]
    assert [r["step"] for r in d_rows] == [0, 4]
    for r in d_rows:
        assert 0.0 <= r["eval/d_acc"] <= 1.0
        n_maps = len([k for k in r if k.startswith("eval/d_map") and k.endswith("_real")])
        assert n_maps == 1 + 3 * len(TINY_UNET.up_block_types), r.keys()
