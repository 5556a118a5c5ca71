"""Stage 1 end to end on the tiny config: it learns, leaves every artefact, exports a diffusers U-Net that
computes the same generator, resumes exactly after being stopped in a new process, and refuses bad input."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import UNet2DConditionModel

from configs import tiny
from d2g_jax import pipeline
from d2g_jax.data.pairs_writer import PairsError
from d2g_jax.train.checkpoint import RunMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(teacher: str, pairs: str, **train):
    c = tiny.get_config()
    c.teacher.tiny, c.teacher.path, c.pairs.dir = False, teacher, pairs
    c.pairs.prompts = os.path.join(os.path.dirname(pairs), "prompts.txt")
    c.pairs.num_pairs = 48  # 40 train + 8 held out
    c.train.eval_every = c.train.sample_every = 0
    c.stage2.num_steps = 0  # stage 1 alone (stage 2 is covered by the resume test and tests/train/stage2_test.py)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_learns_and_leaves_artefacts(data, tmp_path):
    teacher, pairs = data
    wd = str(tmp_path / "run")
    c = _config(teacher, pairs, num_steps=20, lr=5e-4, lr_end=5e-5, eval_every=20, sample_every=20, ckpt_every=10,
                log_every=10, ema_start=1000)  # fmt: skip
    c.mode = "all"
    # The paper's metrics during training, on a small subset (random-weight CLIP / DreamSim files: smoke only).
    c.eval.every, c.eval.subset, c.eval.metrics, c.eval.dreamsim_num = 20, 4, "clip,dreamsim", 4
    c.eval.prompts = c.pairs.prompts
    pipeline.run(c, wd)

    with open(os.path.join(wd, "eval", "stage1_step_00000020_subset4.json")) as f:
        paper = json.load(f)
    assert paper["step"] == 20 and paper["metrics"]["num_images"] == 4 and paper["metrics"]["dreamsim_num"] == 4
    assert np.isfinite(paper["metrics"]["clip_score"]) and paper["metrics"]["dreamsim"] > 0

    rows = _jsonl(os.path.join(wd, "stage1", "metrics.jsonl"))
    evals = [r for r in rows if "eval/mse" in r]
    assert [r["step"] for r in evals] == [0, 20]
    first, last = evals
    # Held-out pairs (never trained on): the one-step student moves clearly toward the teacher's ODE outputs.
    # eval/distill is the training objective on them: E-LatentLPIPS* with the official L1 term.
    assert last["eval/mse"] < 0.7 * first["eval/mse"], (first, last)
    assert last["eval/distill"] < 0.8 * first["eval/distill"], (first, last)
    # The perceptual part alone (random LatentVGG here, unit-normalised features, nearly blind to the 1/α_T ≈ 15×
    # overshoot of a random teacher's x0 = (z − σε)/α at step 0) moves slowly in 20 steps; it must not get worse.
    assert last["eval/e_latent_lpips"] < first["eval/e_latent_lpips"], (first, last)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [10, 20] and all(np.isfinite(r["loss"]) for r in train)

    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints"))) == ["10", "20"]
    assert glob.glob(os.path.join(wd, "stage1", "tb", "events.out.tfevents.*"))
    assert os.path.isfile(os.path.join(wd, "stage1", "samples", "step_00000020.png"))
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(wd, "stage1", "samples", "step_00000020.png")))
    assert grid.shape == (2 * 32, 4 * 32, 3) and grid.std() > 0  # teacher row over student row, 4 samples

    # The export is a diffusers U-Net; with x0 = (z − σ_T ε(z, T)) / α_T it is the trained generator.
    out = os.path.join(wd, "export", "step_00000020")
    info = json.load(open(os.path.join(out, "export.json")))
    assert info["step"] == 20 and info["timestep"] == 999
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        eps = unet(torch.from_numpy(z).permute(0, 3, 1, 2), 999, torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1)
    x0_torch = (z - info["sigma_T"] * eps.numpy()) / info["alpha_T"]

    from d2g_jax.train.trainer import Trainer

    tr = Trainer(c, wd, teacher, pairs)
    state = tr.restore_or_init()
    assert int(state.step) == 20
    x0 = np.asarray(tr.gen(jax.device_get(state.ema), jnp.asarray(z), {"context": jnp.asarray(ctx)}))
    np.testing.assert_allclose(x0, x0_torch, atol=1e-4 * np.abs(x0_torch).max())

    # The same command again: everything is complete, nothing is redone.
    pipeline.run(c, wd)
    assert len(_jsonl(os.path.join(wd, "stage1", "metrics.jsonl"))) == len(rows)

    # Same workdir, another run's config: refused, nothing touched.
    before = open(os.path.join(wd, "run.json")).read()
    c.train.lr = 1e-3
    with pytest.raises(RunMismatchError, match="train.lr"):
        pipeline.run(c, wd)
    assert open(os.path.join(wd, "run.json")).read() == before
    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints"))) == ["10", "20"]


def _main(wd, teacher, pairs, *extra):
    cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/tiny.py", f"--workdir={wd}", "--config.mode=train",
           "--config.teacher.tiny=False", f"--config.teacher.path={teacher}", f"--config.pairs.dir={pairs}",
           "--config.pairs.num_pairs=48", f"--config.pairs.prompts={os.path.dirname(pairs)}/prompts.txt",
           "--config.train.num_steps=4", "--config.train.ckpt_every=2",
           "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.sample_every=0",
           "--config.stage2.num_steps=4", "--config.stage2.ckpt_every=2", "--config.stage2.log_every=1",
           "--config.stage2.eval_every=0", "--config.stage2.sample_every=0", "--config.disc.r1_interval=2",
           *extra]  # fmt: skip
    # The runs compile the same step: a persistent compilation cache makes the 2nd and 3rd process skip it.
    # One CPU device (sharded steps are tested in multidevice_test.py): a smaller program to compile and load.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(pairs), "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_backend_optimization_level=0")  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _params(wd, step, stage="stage1"):
    state = ocp.StandardCheckpointer().restore(os.path.join(wd, stage, "checkpoints", str(step), "state"))
    keys = ("params", "ema", "opt_state", "step") + (("disc", "disc_opt") if stage == "stage2" else ())
    return {k: state[k] for k in keys}


def test_exact_resume_in_a_new_process(data, tmp_path):
    """One `main` command runs stage 1 (4 steps) then stage 2 (4 steps, lazy R1 on steps 0 and 2); killed once in
    each stage and rerun, it ends bit-identical to the uninterrupted run."""
    teacher, pairs = data
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # loss.kind=mse: resuming does not depend on the loss (E-LatentLPIPS' per-step augmentation draws come from the
    # same folded step key as stage 2's noise augmentation, which is on here), and it halves the compile time.
    mse_aug = ("--config.loss.kind=mse", "--config.disc.noise_aug=True")
    r = _main(straight, teacher, pairs, *mse_aug)
    console = (r.stdout + r.stderr).splitlines()  # default verbosity: d2g_jax's own lines, a progress line per stage
    assert len(console) <= 60, "\n".join(console)
    assert any("stage1 4/4 (100%)" in ln for ln in console) and any("stage2 4/4 (100%)" in ln for ln in console)
    assert any("done: mode=train" in ln for ln in console) and not any("orbax" in ln.lower() for ln in console)
    _main(resumed, teacher, pairs, *mse_aug, "--config.train.stop_after=2")  # "killed" after stage-1 step 2
    assert sorted(os.listdir(os.path.join(resumed, "stage1", "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(resumed, "stage2"))  # a stage stopped early ends the job there
    _main(resumed, teacher, pairs, *mse_aug, "--config.stage2.stop_after=2")  # stage 1 resumes; stage 2 killed at 2
    assert sorted(os.listdir(os.path.join(resumed, "stage2", "checkpoints"))) == ["2"]
    _main(resumed, teacher, pairs, *mse_aug)  # the same command again: stage 1 is done, stage 2 resumes at its step 2
    for stage in ("stage1", "stage2"):
        a, b = (_jsonl(os.path.join(wd, stage, "metrics.jsonl")) for wd in (straight, resumed))
        assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b, stage  # identical per-step metrics, bit for bit
        pa, pb = _params(straight, 4, stage), _params(resumed, 4, stage)
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    s2 = _jsonl(os.path.join(straight, "stage2", "metrics.jsonl"))
    assert [r["r1_applied"] for r in s2] == [1, 0, 1, 0] and all(r["r1"] > 0 for r in s2[::2])
    assert all(np.isfinite(r["d_loss"]) and r["d_grad_norm"] > 0 for r in s2)
    # The stage switch: stage 2 starts from stage 1's last G and EMA, with D = the teacher U-Net (+ zero-init inputs).
    from d2g_jax.models.unet import load_unet
    from d2g_jax.train.stage2_trainer import Stage2Trainer

    c = _config(teacher, pairs, num_steps=4)
    c.stage2.num_steps, c.disc.r1_interval, c.loss.kind, c.disc.noise_aug = 4, 2, "mse", True  # the runs' identity
    init = Stage2Trainer(c, straight, teacher, pairs).initial_state()
    s1 = _params(straight, 4, "stage1")
    for name in ("params", "ema"):
        for x, y in zip(jax.tree.leaves(jax.device_get(getattr(init, name))), jax.tree.leaves(s1[name])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, teacher_vars = load_unet(os.path.join(teacher, "unet"))
    for x, y in zip(jax.tree.leaves(jax.device_get(init.disc["unet"])), jax.tree.leaves(teacher_vars["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.any(np.asarray(init.disc["z_conv"]["kernel"])) and int(init.step) == 0


def test_bad_inputs(data, tmp_path):
    teacher, pairs = data
    # A teacher that does not match the pairs' manifest: refused before anything is written.
    other = str(tmp_path / "other_teacher")
    shutil.copytree(teacher, other)
    cfg_path = os.path.join(other, "scheduler", "scheduler_config.json")
    cfg = json.load(open(cfg_path))
    cfg["beta_end"] = 0.02
    json.dump(cfg, open(cfg_path, "w"))
    wd = str(tmp_path / "wd")
    c = _config(other, pairs, num_steps=2)
    c.mode = "train"
    with pytest.raises(PairsError, match="teacher"):
        pipeline.run(c, wd)
    assert not os.path.exists(os.path.join(wd, "run.json"))
    # Checkpoints without a run.json (another tool's or a hand-copied run): refused.
    os.makedirs(os.path.join(wd, "stage1", "checkpoints", "100"))
    with pytest.raises(RunMismatchError, match="run.json is missing"):
        pipeline.run(_config(teacher, pairs, num_steps=2), wd)
    # Unknown field / wrong type on the command line: the field is named, nothing runs.
    for flag, needle in (("--config.train.bogus=1", "config.train has no field 'bogus'"),
                         ("--config.train.lr=abc", "--config.train.lr=abc")):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "d2g_jax.main", "--config=configs/tiny.py",
                            f"--workdir={tmp_path / 'never'}", flag], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
        assert not os.path.exists(tmp_path / "never")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    from d2g_jax.train.trainer import NonFiniteError, Trainer

    teacher, pairs = data
    wd = str(tmp_path / "nan")
    c = _config(teacher, pairs, num_steps=6, ckpt_every=2, log_every=1)
    tr = Trainer(c, wd, teacher, pairs)
    real, calls = tr.global_batch, []

    def poisoned(local):  # the 3rd batch carries a NaN target
        calls.append(1)
        if len(calls) == 3:
            local = dict(local, latent=np.full_like(local["latent"], np.nan))
        return real(local)

    tr.global_batch = poisoned
    with pytest.raises(NonFiniteError, match="step 3") as e:
        tr.run()
    assert "last good checkpoint is step 2" in str(e.value)
    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints"))) == ["2"]
    assert int(_params(wd, 2)["step"]) == 2


def test_gradient_accumulation_equals_the_full_batch(data, tmp_path):
    """grad_accum=2 (a lax.scan over two micro-batches of 8) takes the same step as one batch of 16."""
    from d2g_jax.train.trainer import Trainer

    teacher, pairs = data
    out = []
    for accum in (1, 2):
        # lr = adam_eps = 1: Adam's first step is then smooth in the gradient instead of ≈ lr·sign(g), whose sign
        # flips on near-zero gradients under fp32 reordering and would hide a wrongly scaled gradient.
        c = _config(teacher, pairs, num_steps=2, grad_accum=accum, batch_size=16,  # 8 devices × 2 micro-batches
                    lr=1.0, lr_end=1.0, lr_schedule="constant", adam_eps=1.0)  # fmt: skip
        c.loss.kind = "mse"  # deterministic per example (no augmentation draw), so the two must agree exactly
        tr = Trainer(c, str(tmp_path / f"accum{accum}"), teacher, pairs)
        state, m = tr.step_fn(tr.initial_state(), tr.frozen, tr.global_batch(next(tr.loader)))
        out.append((jax.device_get(m), jax.tree.map(np.asarray, state.params)))
    (m1, p1), (m2, p2) = out
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 + 1e-5 * np.abs(a).max())
