"""Train steps: stage 1 (generator fwd+bwd through E-LatentLPIPS*, Adam, EMA): step time, img/s, FLOPs, MFU;
stage 2 (`--stages 1,2`: + the multi-scale conditional discriminator, mix-and-match and lazy single-sample R1):
step time with and without R1, peak memory.

    python bench/train_step.py [--sizes tiny,mid] [--stages 1,2] [--device cpu|gpu] [--iters 5] [--batch 8]

Runs the trainer's own jitted step (`d2g_jax.train.steps.make_train_step`: x0-parameterised U-Net generator,
E-LatentLPIPS* with bg+cutout augmentation and the L1 term, Adam + decoupled weight decay, EMA) on random weights
and a random batch, for U-Nets of three sizes:

* tiny: the tiny config's U-Net (32/64 channels) on 16×16 latents;
* mid:  an SD1.5-shaped U-Net at 40% width (128/256/512/512 channels) on 32×32 latents;
* sd15: the full SD1.5 U-Net (860M) on 64×64 latents (GPU/TPU; ~45 s to random-init on CPU and minutes per step).

The text encoder is replaced by an embedding lookup of the same output shape (CLIP-L is frozen and costs ~1% of
the step); the LatentVGG has random weights (same cost as the official ones). FLOPs come from XLA's cost analysis
of the compiled step; MFU = FLOPs / step time / peak (`--peak_tflops`, default by device: H100 989, H200 989,
A100 312 dense bf16). Everything is measured in this one process, side by side, so ratios between rows hold even on
a noisy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak


class RandomContext:
    """Stand-in for the frozen CLIP text encoder: ids → a random embedding table lookup ([B, 77, D])."""

    def __init__(self, dim: int, vocab: int = 1000):
        self.dim, self.vocab, self.modules = dim, vocab, (None,)

    def embed(self, params, ids, masks=None):
        return {"context": params[0][ids[0]]}


def random_tree(abstract, key, scale: float = 0.02):
    """N(0, scale²) values for a tree of shapes, drawn as one flat vector (one RNG op: quick to compile even for
    SD's ~700 tensors)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves, tree = jax.tree.flatten(abstract)
    sizes = [int(np.prod(a.shape)) for a in leaves]
    flat = scale * jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(tree, [p.reshape(a.shape).astype(a.dtype) for p, a in zip(parts, leaves)])


def unet_config(size: str):
    from d2g_jax.models.tiny import TINY_UNET
    from d2g_jax.models.unet_config import UNetConfig

    sd15 = UNetConfig.from_diffusers({"cross_attention_dim": 768, "sample_size": 64})
    if size == "tiny":
        return TINY_UNET, 16
    if size == "mid":
        return dataclasses.replace(sd15, block_out_channels=(128, 256, 512, 512), sample_size=32), 32
    if size == "sd15":
        return sd15, 64
    raise ValueError(size)


def setup(size: str, batch: int, dtype: str, remat: str, concrete: bool = True):
    """What both steps share: the U-Net (random weights, sharded), the generator, the stand-in text encoder, the
    E-LatentLPIPS* loss (random LatentVGG), a random batch and the shardings of the step's inputs.

    `concrete=False`: params, batch and frozen inputs are `jax.ShapeDtypeStruct`s (nothing allocated), for lowering
    a step only (its FLOP count: `bench/gpu_suite.py --flops_only`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from d2g_jax import sharding as shd
    from d2g_jax.losses.elatentlpips import e_latent_lpips, random_latent_lpips
    from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables
    from d2g_jax.sampling import DDIMSchedule
    from d2g_jax.train.generator import Generator

    cfg, side = unet_config(size)
    ctx_dim = cfg.cross_attention_dim[0]
    unet = UNet2DConditionModel(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, remat_policy=remat)
    mesh = shd.make_mesh(-1, 1)
    boxed = abstract_variables(unet)["params"]
    p_sh = shd.param_shardings(boxed, mesh)
    abstract = nn.unbox(boxed)

    def init(key):
        return random_tree(abstract, key)

    t0 = time.perf_counter()
    if concrete:
        params = jax.jit(init, out_shardings=p_sh)(jax.random.PRNGKey(0))
        jax.block_until_ready(params)
    else:
        params = jax.eval_shape(init, jax.random.PRNGKey(0))
    init_s = time.perf_counter() - t0

    def loss_fn(v, x, y, rng):
        return e_latent_lpips(v, x, y, rng, preset="bgo", l1=True, mode="star", dtype=jnp.dtype(dtype))

    rng = np.random.default_rng(0)
    data = {
        "noise": jnp.asarray(rng.standard_normal((batch, side, side, 4)), jnp.float32),
        "latent": jnp.asarray(rng.standard_normal((batch, side, side, 4)), jnp.float32),
        "ids": (jnp.asarray(rng.integers(0, 1000, (batch, 77)), jnp.int32),),
        "masks": (jnp.ones((batch, 77), jnp.int32),),
    }
    frozen = {"text": (jnp.asarray(rng.standard_normal((1000, ctx_dim)), jnp.float32),),
              "loss": random_latent_lpips("sd15", 0)}  # fmt: skip
    if not concrete:
        data, frozen = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t) for t in (data, frozen))
    b4, b2 = shd.batch_sharding(mesh, 4), shd.batch_sharding(mesh, 2)
    return types.SimpleNamespace(
        unet=unet, side=side, mesh=mesh, p_sh=p_sh, params=params, init_s=init_s,
        n_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        gen=Generator(unet, DDIMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        text=RandomContext(ctx_dim), loss_fn=loss_fn, data=data, frozen=frozen, rep=shd.replicated(mesh),
        data_sh={"noise": b4, "latent": b4, "ids": (b2,), "masks": (b2,)},
    )  # fmt: skip


def compile_step(step, state, sh, s):
    """jit with explicit shardings, AOT compile → (compiled, compile seconds, FLOPs, XLA temp GiB)."""
    import jax

    fn = jax.jit(step, in_shardings=(sh, s.rep, s.data_sh), out_shardings=(sh, s.rep), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, s.frozen, s.data).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    mem = compiled.memory_analysis()
    temp_gib = mem.temp_size_in_bytes / 2**30 if mem is not None else float("nan")
    return compiled, compile_s, flops, temp_gib


def run(size: str, batch: int, iters: int, dtype: str, remat: str, peak: float | None) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from d2g_jax.train.optim import make_optimizer
    from d2g_jax.train.state import TrainState, state_shardings
    from d2g_jax.train.steps import make_train_step

    s = setup(size, batch, dtype, remat)
    params = s.params
    t = ml_collections.ConfigDict({"grad_accum": 1, "ema_start": 0, "ema_beta": 0.9999})
    tx, lr_fn = make_optimizer(params, lr=1e-4, lr_end=1e-5, num_steps=1000)
    state = TrainState(step=jnp.int32(0), params=params, ema=jax.tree.map(jnp.copy, params),
                       opt_state=jax.jit(tx.init)(params), rng=jax.random.PRNGKey(1))  # fmt: skip
    sh = state_shardings(jax.eval_shape(lambda x: x, state), s.p_sh, s.mesh)
    step = make_train_step(s.gen, s.text, s.loss_fn, t, tx, lr_fn, 1.0)
    compiled, compile_s, flops, temp_gib = compile_step(step, state, sh, s)
    state, m = compiled(state, s.frozen, s.data)
    jax.block_until_ready(m)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state, m = compiled(state, s.frozen, s.data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    mfu = flops / dt / (peak * 1e12) if peak else None
    return dict(size=size, params_m=s.n_params / 1e6, latent=s.side, batch=batch, init_s=s.init_s,
                compile_s=compile_s, step_s=dt, img_s=batch / dt, tflop=flops / 1e12,
                temp_gib=temp_gib, mfu=mfu, loss=float(m["loss"]))  # fmt: skip


def run_stage2(size: str, batch: int, iters: int, dtype: str, remat: str) -> dict:
    """The stage-2 step (G through E-LatentLPIPS* + GAN, D on real+fake with mix-and-match, lazy single-sample R1):
    `disc.r1_interval=2` so steps alternate R1 / no R1 and both are timed from one compile. (FLOPs are not
    reported: XLA's cost analysis counts both branches of the R1 `lax.cond`.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import base
    from d2g_jax import sharding as shd
    from d2g_jax.train.discriminator import Discriminator, abstract_disc_variables, init_disc_params
    from d2g_jax.train.optim import make_optimizer
    from d2g_jax.train.stage2 import make_stage2_step
    from d2g_jax.train.state import TrainState, state_shardings

    s = setup(size, batch, dtype, remat)
    params = s.params
    disc = Discriminator(s.unet)
    d_sh = shd.param_shardings(abstract_disc_variables(disc)["params"], s.mesh)
    dparams = jax.device_put(init_disc_params(disc, jax.device_get(params)), d_sh)
    n_dparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dparams))
    c = base.get_config()
    t = c.train
    t.batch_size, t.ema_start = batch, 0
    dc = c.disc
    dc.r1_interval = 2
    tx, lr_fn = make_optimizer(params, lr=1e-4, lr_end=1e-5, num_steps=1000)
    dtx, dlr_fn = make_optimizer(dparams, lr=1e-4, lr_end=1e-5, num_steps=1000)
    state = TrainState(step=jnp.int32(0), params=params, ema=jax.tree.map(jnp.copy, params),
                       opt_state=jax.jit(tx.init)(params), rng=jax.random.PRNGKey(1), disc=dparams,
                       disc_opt=jax.jit(dtx.init)(dparams))  # fmt: skip
    sh = state_shardings(jax.eval_shape(lambda x: x, state), s.p_sh, s.mesh, d_sh)
    step = make_stage2_step(s.gen, disc, s.text, s.loss_fn, t, dc, tx, lr_fn, dtx, dlr_fn, distill_weight=1.0,
                            gan_weight=0.25)  # fmt: skip
    compiled, compile_s, _, temp_gib = compile_step(step, state, sh, s)
    for _ in range(2):  # warm-up: one R1 step, one plain step
        state, m = compiled(state, s.frozen, s.data)
    jax.block_until_ready(m)
    plain, r1 = [], []
    for _ in range(iters):
        for bucket in (r1, plain):  # the state's step is even → R1 due
            t0 = time.perf_counter()
            state, m = compiled(state, s.frozen, s.data)
            jax.block_until_ready(m)
            bucket.append(time.perf_counter() - t0)
    assert float(m["r1_applied"]) == 0.0
    dt, dt_r1 = statistics.median(plain), statistics.median(r1)
    peak_gib = None
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        peak_gib = stats["peak_bytes_in_use"] / 2**30
    amortised = (15 * dt + dt_r1) / 16  # Table A1: R1 every 16 steps
    return dict(size=size, params_m=s.n_params / 1e6, dparams_m=n_dparams / 1e6, latent=s.side, batch=batch,
                compile_s=compile_s, step_s=dt, r1_step_s=dt_r1, amortised_s=amortised, img_s=batch / amortised,
                temp_gib=temp_gib, peak_gib=peak_gib, loss=float(m["loss"]))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--peak_tflops", type=float, default=None)
    p.add_argument("--stages", default="1", help="1, 2 or 1,2 (stage 2 = G+D+R1 step)")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    stages = args.stages.split(",")
    if "1" not in stages:
        return main_stage2(args, kind)
    print(f"\nStage-1 train step (E-LatentLPIPS* bgo + L1, Adam, EMA), {args.dtype} compute / fp32 params, "
          f"device {kind} ×{jax.device_count()}, median of {args.iters}\n")  # fmt: skip
    print("| U-Net | params (M) | latent | batch | compile (s) | step (s) | img/s | TFLOP/step | XLA temp (GiB) | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for size in args.sizes.split(","):  # each row printed as soon as it is measured (a time limit keeps the rest)
        r = run(size, args.batch, args.iters, args.dtype, args.remat, peak)
        rows.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
        print(f"| {r['size']} | {r['params_m']:.1f} | {r['latent']}×{r['latent']} | {r['batch']} | {r['compile_s']:.1f} "
              f"| {r['step_s']:.3f} | {r['img_s']:.2f} | {r['tflop']:.3f} | {r['temp_gib']:.2f} | {mfu} |", flush=True)  # fmt: skip
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(f"* {r['size']} / {base['size']}: step time {r['step_s'] / base['step_s']:.1f}×, "
                  f"FLOPs {r['tflop'] / base['tflop']:.1f}×")  # fmt: skip


    if "2" in stages:
        main_stage2(args, kind)


def main_stage2(args, kind) -> None:
    import jax

    print(f"\nStage-2 train step (G: E-LatentLPIPS* + λ·GAN; D: real+fake with mix-and-match; single-sample R1), "
          f"{args.dtype} compute / fp32 params, device {kind} ×{jax.device_count()}, median of {args.iters}\n")  # fmt: skip
    print("| U-Net | G / D params (M) | latent | batch | compile (s) | step (s) | R1 step (s) | step, R1 every 16 (s) "
          "| img/s | XLA temp (GiB) | peak (GiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for size in args.sizes.split(","):
        r = run_stage2(size, args.batch, args.iters, args.dtype, args.remat)
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "–"
        print(f"| {r['size']} | {r['params_m']:.1f} / {r['dparams_m']:.1f} | {r['latent']}×{r['latent']} | {r['batch']} "
              f"| {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['r1_step_s']:.3f} | {r['amortised_s']:.3f} "
              f"| {r['img_s']:.2f} | {r['temp_gib']:.2f} | {peak} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
