"""Where a training step's time goes on the MNIST world: the parts of configs/mnist.py's stage-1 and stage-2 steps,
each timed alone, as milliseconds per call and share of the full step.

    python bench/step_profile.py [--iters 10] [--no_stage2] [--workdir /tmp/d2g_step_profile] [--pairs DIR]
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/step_profile.py     # the CPU as 2 devices

Everything comes from the trainer's own code: `pipeline.resolve_world` (d2g_jax.world.mnist) fills the config,
`pipeline.make_trainer` builds `Trainer` / `Stage2Trainer` (U-Net, text encoder, E-LatentLPIPS* with the world's
LatentVGG, optimiser, mesh over `jax.device_count()` devices, shardings, the jitted step, the grain loader), so
shapes, dtypes and the batch (64) are configs/mnist.py's. Pairs: `--pairs DIR`, else 512 teacher pairs made once in
`<workdir>/pairs` by `python -m d2g_jax.main --config=configs/mnist.py --config.mode=pairs`. Stage 2 starts from the
teacher's weights (no stage-1 checkpoint needed; same cost). Each row is a jitted function on the trainer's sharded
inputs timed by bench/timing.py: the first call (compile + run) apart, then the median of `--iters` calls, each
blocked until ready. Rows marked * add up to the step; the others are parts of a * row or outside the device step.

Stage 1:
* host input: `next(loader)` + tokenisation + global arrays (`Trainer.global_batch`); the loop overlaps it with the
  previous step (asynchronous dispatch), so it is not in the sum;
* text encoder*: the frozen CLIP embedding of the batch's prompts;
* G forward: the x0-parameterised U-Net (train/generator.py), part of the next row;
* G forward+backward*: the gradient w.r.t. G's params of <G(z, c), r> for a fixed random r (G's pull-back);
* augmentation: E-LatentLPIPS*'s draw + warp + cutout (`loss.augment`, bgo) of both inputs, part of the next two;
* loss forward: E-LatentLPIPS* (augmentation, LatentVGG on [augmented; plain], L1 term) on G's output;
* loss forward+backward*: the same and its gradient w.r.t. G's output;
* update*: global gradient norm + `steps.guarded_update` (Adam, decoupled weight decay, lr schedule, EMA), donated;
* full step: the trainer's jitted, donated `step_fn` (`steps.make_train_step`) on a device batch.
The sum of the * rows over the full step is what compiling the step as one program gains (fusion, no copies).

Stage 2 (`Stage2Trainer.step_fn`, `stage2.make_stage2_step`; off with `--no_stage2`):
* D forward+backward: D (z-conditional, multi-scale U-Net) on the 2B interleaved real+fake rows, its loss, gradient;
* full step without R1, with R1 (lazy single-sample R1, every `disc.r1_interval` steps: the state's step is set to
  a due / not-due value before each call), R1's extra time, and the mean step over one R1 interval.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

from timing import time_calls  # noqa: E402  (bench/timing.py)


def ensure_pairs(workdir: str, num_pairs: int) -> str:
    """`<workdir>/pairs`: configs/mnist.py's teacher pairs, made by the real `main` once."""
    pdir = os.path.join(workdir, "pairs")
    man = os.path.join(pdir, "manifest.json")
    if os.path.isfile(man) and json.load(open(man)).get("complete"):
        return pdir
    cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", f"--workdir={workdir}",
           "--config.mode=pairs", f"--config.pairs.num_pairs={num_pairs}", f"--config.pairs.dir={pdir}"]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] pairs: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return pdir


def load_config(workdir: str, pdir: str):
    """configs/mnist.py as `main` runs it (mode=train), the world resolved into `workdir`."""
    from configs import mnist
    from d2g_jax.pipeline import resolve_world
    from d2g_jax.validate import validate

    config = mnist.get_config()
    config.mode = "train"
    config.pairs.dir = pdir
    config.pairs.num_pairs = int(json.load(open(os.path.join(pdir, "manifest.json")))["num_pairs"])
    validate(config, workdir)
    config = resolve_world(config, workdir)
    validate(config, workdir)
    return config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no_stage2", action="store_true", help="stage 1 only")
    ap.add_argument("--workdir", default="/tmp/d2g_step_profile")
    ap.add_argument("--pairs", default="", help="a complete pair set of configs/mnist.py's teacher (default: made)")
    ap.add_argument("--num_pairs", type=int, default=512)
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    pdir = os.path.abspath(a.pairs) if a.pairs else ensure_pairs(a.workdir, a.num_pairs)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import logging

    from d2g_jax import console, pipeline
    from d2g_jax import sharding as shd
    from d2g_jax.losses import augment
    from d2g_jax.train.discriminator import ns_d_loss, readout_maps
    from d2g_jax.train.steps import global_norm, guarded_update

    console.setup(False)
    logging.set_verbosity(logging.WARNING)  # the trainers' set-up and Orbax INFO lines
    config = load_config(a.workdir, pdir)
    tw = os.path.join(a.workdir, "profile")  # the trainers' run directory (run.json), fresh each time
    shutil.rmtree(tw, ignore_errors=True)
    block = jax.block_until_ready
    rows: list[tuple[str, str, bool, float, float]] = []  # (stage, part, in sum, first s, median s)

    def add(stage: str, part: str, fn, in_sum: bool = False):
        first, med, out = time_calls(fn, a.iters)
        rows.append((stage, part, in_sum, first, med))
        print(f"  {stage} {part}: first {first:.2f} s, median {1e3 * med:.1f} ms", flush=True)
        return out

    tr = pipeline.make_trainer(config, tw, "stage1")
    held = {"state": tr.initial_state()}
    batch = block(tr.global_batch(next(tr.loader)))
    b, side = batch["noise"].shape[0], batch["noise"].shape[1:]
    print(f"\n{jax.device_count()} device(s) ({jax.devices()[0].device_kind}), mesh {dict(tr.mesh.shape)}, batch {b}, "
          f"latent {side}, {tr.t.dtype}, median of {a.iters} calls\n", flush=True)  # fmt: skip

    add("stage 1", "host input (loader + tokenise + global arrays)", lambda: block(tr.global_batch(next(tr.loader))))
    embed = jax.jit(lambda fz, bt: tr.text.embed(fz["text"], bt["ids"], bt["masks"]))
    cond = add("stage 1", "text encoder (frozen)", lambda: block(embed(tr.frozen, batch)), True)
    g_fwd = jax.jit(lambda p, z, c: tr.gen(p, z, c))
    params = held["state"].params
    x0 = add("stage 1", "G forward (U-Net, x0)", lambda: block(g_fwd(params, batch["noise"], cond)))
    r = jax.device_put(np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32), x0.sharding)
    g_fb = jax.jit(lambda p, z, c, r: jax.grad(lambda q: jnp.sum(tr.gen(q, z, c) * r))(p), out_shardings=tr.param_sh)
    grads = add("stage 1", "G forward+backward", lambda: block(g_fb(params, batch["noise"], cond, r)), True)
    key = jax.random.fold_in(held["state"].rng, 0)
    lat = batch["latent"]
    aug = jax.jit(lambda x, y, k: augment.augment_pair(k, x, y, config.loss.augment))
    add("stage 1", f"augmentation ({config.loss.augment}, both inputs)", lambda: block(aug(x0, lat, key)))
    loss_of = lambda x, v, y, k: jnp.mean(tr.loss_fn(v, x, y, k).astype(jnp.float32))
    l_fwd, l_fb = jax.jit(loss_of), jax.jit(jax.value_and_grad(loss_of))
    fz = tr.frozen["loss"]
    add("stage 1", "loss forward (E-LatentLPIPS*)", lambda: block(l_fwd(x0, fz, lat, key)))
    loss, _ = add("stage 1", "loss forward+backward (w.r.t. G's output)", lambda: block(l_fb(x0, fz, lat, key)), True)

    def update(st, g, lo):
        gn = global_norm(g)
        return guarded_update(st, jnp.isfinite(lo) & jnp.isfinite(gn), tr.t, tx=tr.tx, grads=g)

    upd = jax.jit(update, out_shardings=tr.state_sh, donate_argnums=(0,))

    def run_update():
        held["state"] = block(upd(held["state"], grads, loss))

    add("stage 1", "update (grad norm + Adam + wd + EMA)", run_update, True)

    def run_step(trainer, hold, bt, step=None):
        def fn():
            st = hold["state"]
            if step is not None:  # stage 2: an R1-due or a not-due step
                st = st.replace(step=jax.device_put(np.int32(step), trainer.state_sh.step))
            hold["state"], m = trainer.step_fn(st, trainer.frozen, bt)
            return block((hold["state"], m))[1]

        return fn

    add("stage 1", "**full step** (Trainer.step_fn)", run_step(tr, held, batch))
    interval = 0
    if not a.no_stage2:
        s2 = pipeline.make_trainer(config, tw, "stage2")
        teacher = lambda: shd.put_global(s2.init_params, s2.param_sh)
        s2._restore_stage1 = lambda: (teacher(), teacher(), 0)  # G and EMA from the teacher: no stage-1 checkpoint
        held2 = {"state": s2.initial_state()}
        batch2 = block(s2.global_batch(next(s2.loader)))
        dc = s2.config.disc

        def d_fb(dp, real, fake, z, ctx):
            both = lambda u, v: jnp.stack([u, v], axis=1).reshape(2 * u.shape[0], *u.shape[1:])
            td = jnp.full((2 * real.shape[0],), int(dc.timestep), jnp.int32)

            def obj(dp):
                maps = readout_maps(s2.disc.apply({"params": dp}, both(real, fake), both(z, z), td, both(ctx, ctx)),
                                    dc.eps_map)  # fmt: skip
                split = [m.reshape(real.shape[0], 2, *m.shape[1:]) for m in maps]
                return ns_d_loss([m[:, 0] for m in split], [m[:, 1] for m in split])

            return jax.value_and_grad(obj)(dp)

        d_fb = jax.jit(d_fb)
        dp = held2["state"].disc
        args = (batch2["latent"], x0, batch2["noise"], cond["context"])
        add("stage 2", "D forward+backward (2B real+fake rows)", lambda: block(d_fb(dp, *args)))
        interval, off = int(dc.r1_interval), int(dc.r1_offset)
        plain = add("stage 2", "**full step, no R1**", run_step(s2, held2, batch2, (off + 1) % interval))
        r1 = add("stage 2", "full step with R1", run_step(s2, held2, batch2, off))
        assert float(plain["r1_applied"]) == 0.0 and float(r1["r1_applied"]) == 1.0
    print_table(rows, interval)


def print_table(rows, interval: int) -> None:
    """The markdown table; `interval`: stage 2's R1 interval (0 = no stage 2)."""
    print("\n| stage | part | in sum | first call (s) | ms / call | share of step |\n|---|---|---|---|---|---|")
    full = {s: m for s, p, _, _, m in rows if p.startswith("**full step")}
    for s, p, in_sum, first, med in rows:
        print(f"| {s} | {p} | {'*' if in_sum else ''} | {first:.2f} | {1e3 * med:.1f} | {med / full[s]:.0%} |")
    by = lambda s, p: next(m for s_, p_, _, _, m in rows if s_ == s and p_.startswith(p))
    if interval:
        plain, r1 = full["stage 2"], by("stage 2", "full step with R1")
        mean = ((interval - 1) * plain + r1) / interval
        print(f"| stage 2 | R1 extra (with − without) | | | {1e3 * (r1 - plain):.1f} | {(r1 - plain) / plain:.0%} |")
        print(f"| stage 2 | mean step, R1 every {interval} | | | {1e3 * mean:.1f} | {mean / plain:.0%} |")
    total = sum(m for s, _, in_sum, _, m in rows if in_sum)
    f1 = full["stage 1"]
    print(f"\nstage 1: sum of the * parts {1e3 * total:.1f} ms vs the full step {1e3 * f1:.1f} ms: "
          f"fusion gain {total / f1:.2f}× (sum / full); host input {by('stage 1', 'host input') / f1:.0%} of a step "
          "(overlapped by the loop's asynchronous dispatch)")  # fmt: skip


if __name__ == "__main__":
    main()
