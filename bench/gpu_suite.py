"""The GPU suite: SD1.5-scale training steps (MFU, memory, the fewer-GPU recipe) and sampling, in one prepared run.

    python bench/gpu_suite.py --sizes sd15 --out $OUT            # on a lent GPU (≤ 10 min a command)
    python bench/gpu_suite.py --sizes tiny --out /tmp/gpu_suite  # CPU dry run of every row (tiny shapes)

Rows, each printed the moment it is measured and appended to `<out>/gpu_suite.json` (so a time limit keeps what
was measured):

0. **peak**: the device's bf16 matmul rate (8192³, the ceiling MFU is taken against), measured here.
1. **stage 1**: the trainer's own step (`make_train_step`: x0-parameterised U-Net generator, bf16 compute on fp32
   masters, E-LatentLPIPS* with bg + cutout and the L1 term, Adam + decoupled weight decay, EMA), block remat
   (`--remat`, default `nothing_saveable`), at the largest per-device batch of `--s1_batches` (32, 16, 8) whose
   compiled program fits the device (XLA's memory analysis against the allocator's limit, checked before running).
   Columns: step time, img/s, model TFLOP/step, MFU, XLA's TFLOP/step (with remat recompute), peak memory.
   FLOPs: XLA's cost analysis of the *lowered* step without remat and with XLA's attention (cuDNN's flash
   attention is a custom call that the cost analysis does not count) = the model's FLOPs, precomputed on any
   machine by `--flops_only` into `bench/gpu_suite_flops.json` (tracing SD's stage-2 step takes minutes).
   MFU = model FLOPs / step time / the measured bf16 peak (the datasheet's 989 TFLOP/s is printed beside it).
2. **profile**: `jax.profiler` trace of 3 stage-1 steps (`<out>/trace/`), summarised on the device: GPU time by
   XLA op category and the top ops with their JAX op names (`<out>/profile_summary.txt`).
3. **stage 2** (run first, see `main`): the stage-2 step (`make_stage2_step`: G through E-LatentLPIPS* + λ·GAN,
   the multi-scale conditional discriminator on real + fake with mix-and-match, single-sample R1) with the same
   remat, at the largest batch of `--s2_batches` that fits — the fewer-GPU recipe: `train.grad_accum`
   micro-batches of this size give the paper's batch. R1 every 2nd step in the bench so both kinds of step are
   timed from one compile; "R1 every 16" = (15 · plain + R1) / 16, Table A1's interval.
4. **sampling**: one-step student vs the 50-step CFG-3 DDIM teacher at 512 px, batch 1 and 8, through
   `d2g_jax.generate.OneStepSampler` (text encoder → U-Net → VAE decode → uint8, one jitted function each).
5. **variant** (`--variants`): stage 1 again with another remat policy ("none" = no remat) — the change tried.

Random weights in the real architectures: the SD1.5 U-Net (860M, 64×64×4 latents, 77×768 context), the official
LatentVGG16-BN shape, SD's VAE decoder; the text encoder of the train steps is an embedding lookup of CLIP-L's
output shape (frozen, ~1% of a step), the sampler's a 12-layer CLIP-shaped encoder.

Compilation cache: `--cache_dir` (default `/root/.cache/d2g_jax_xla`) holds XLA's persistent compilation cache, so
a rerun on the same (still warm) machine spends its time measuring. It is not under `$OUT`, which the device tool
empties before every command.

`--budget_s`: rows whose estimated cost exceeds the time left are skipped (printed as such) instead of being cut
off mid-compile by the command's time limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import gzip
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
PAPER = {"stage1_img_s_per_a100": 127.5 / 8, "student_s": 0.09, "teacher_s": 2.59}  # §4 / Table 3, A100
# Rough cost of each row (seconds) at SD scale on an H100/H200-class GPU, for the budget check; tiny rows are cheap.
SD_COST = {"peak": 10, "stage2": 200, "stage1": 90, "profile": 30, "sample1": 90, "sample8": 70, "variant": 90}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class Suite:
    def __init__(self, args):
        self.args, self.rows = args, []
        os.makedirs(args.out, exist_ok=True)
        self.path = os.path.join(args.out, "gpu_suite.json")

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - T0)

    def affordable(self, name: str) -> bool:
        need = SD_COST[name] if self.args.sizes != "tiny" else 5
        if self.left() < need:
            log(f"SKIP {name}: ~{need} s needed, {self.left():.0f} s left of --budget_s")
            self.add({"row": name, "skipped": f"budget: ~{need} s needed, {self.left():.0f} s left"})
            return False
        return True

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path + ".tmp", "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows}, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


# ------------------------------------------------------------------------------------------------------------
# Device facts


def device_memory() -> tuple[float | None, float | None]:
    """(allocator limit GiB, peak in use GiB) from the first device, or (None, None) on CPU."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    lim, peak = stats.get("bytes_limit"), stats.get("peak_bytes_in_use")
    return (lim / 2**30 if lim else None), (peak / 2**30 if peak else None)


def measure_peak(tiny: bool) -> float:
    """bf16 matmul TFLOP/s (median of 5 rounds of 10 back-to-back products after a warm-up)."""
    import jax
    import jax.numpy as jnp

    n = 512 if tiny else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        outs = [mm(a, b) for _ in range(10)]
        jax.block_until_ready(outs)
        rates.append(10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return statistics.median(rates)


def fits(compiled, limit_gib: float | None) -> tuple[bool, float]:
    """Whether XLA's memory analysis of a compiled step fits the allocator's limit; (fits, needed GiB)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return True, float("nan")
    need = getattr(ma, "peak_memory_in_bytes", 0) or (
        ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    )
    need_gib = need / 2**30
    return (limit_gib is None or need_gib < 0.97 * limit_gib), need_gib


def lowered_flops(fn, *args) -> float:
    """FLOPs of XLA's cost analysis of the lowered (unoptimised) program; XLA's attention is forced so that
    attention's matmuls are counted (cuDNN's flash attention is an opaque custom call)."""
    import jax

    from d2g_jax.models.blocks import attention_implementation

    with attention_implementation("xla"):
        lowered = jax.jit(fn).lower(*args)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


FLOPS_FILE = os.path.join(ROOT, "bench", "gpu_suite_flops.json")


def flops_table() -> dict:
    if os.path.isfile(FLOPS_FILE):
        with open(FLOPS_FILE) as f:
            return json.load(f)
    return {}


def flops_only(args) -> None:
    """Model FLOPs of the steps, from XLA's cost analysis of the lowered programs (no remat, XLA attention) with
    abstract inputs: nothing is allocated or compiled, so the SD-scale numbers come from any machine. The counts do
    not depend on the device; the GPU run reads them from `bench/gpu_suite_flops.json` instead of spending minutes
    of device time tracing."""
    table = flops_table()
    entry = table.setdefault(args.sizes, {})
    for b in args.s1_batches:
        t0 = time.perf_counter()
        s, state, _, _, step_nr = stage1_parts(args.sizes, b, "none", concrete=False)
        entry.setdefault("stage1", {})[str(b)] = lowered_flops(step_nr, state, s.frozen, s.data)
        log(f"flops: stage1 batch {b}: {entry['stage1'][str(b)] / 1e12:.3f} TFLOP ({time.perf_counter() - t0:.0f} s)")
    for i, b in enumerate(args.s2_batches):
        t0 = time.perf_counter()
        s, state, _, _, (plain, full) = stage2_parts(args.sizes, b, "none", concrete=False)
        entry.setdefault("stage2_plain", {})[str(b)] = f_plain = lowered_flops(plain, state, s.frozen, s.data)
        msg = f"flops: stage2 batch {b}: {f_plain / 1e12:.3f} TFLOP without R1"
        if i == 0:  # R1 runs on one sample whatever the batch: its extra FLOPs are batch-independent
            extra = lowered_flops(full, state, s.frozen, s.data) - f_plain
            entry["stage2_r1_extra"] = extra
            msg += f", R1 step +{extra / 1e12:.3f} TFLOP"
        log(msg + f" ({time.perf_counter() - t0:.0f} s)")
    entry["note"] = ("XLA cost analysis of the lowered steps (no remat, attention as XLA dot products), "
                     f"jax {__import__('jax').__version__}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    with open(FLOPS_FILE, "w") as f:
        json.dump(table, f, indent=1)
    log(f"wrote {FLOPS_FILE}")


def model_flops(size: str, key: str, batch: int) -> float | None:
    v = flops_table().get(size, {}).get(key)
    if isinstance(v, dict):
        v = v.get(str(batch))
    return float(v) if v is not None else None


def abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def timed(fn, iters: int) -> list[float]:
    import jax

    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------------------
# Train steps


def stage1_parts(size: str, batch: int, remat: str, concrete: bool = True):
    """(setup namespace, state, state shardings, step fn, step fn without remat for the FLOP count);
    `concrete=False`: an abstract state (ShapeDtypeStructs) for lowering only."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from bench.train_step import setup
    from d2g_jax.models.unet import UNet2DConditionModel
    from d2g_jax.train.generator import Generator
    from d2g_jax.train.optim import make_optimizer
    from d2g_jax.train.state import TrainState, state_shardings
    from d2g_jax.train.steps import make_train_step

    s = setup(size, batch, "bfloat16", remat, concrete=concrete)
    t = ml_collections.ConfigDict({"grad_accum": 1, "ema_start": 0, "ema_beta": 0.9999})
    tx, lr_fn = make_optimizer(s.params, lr=1e-4, lr_end=1e-5, num_steps=1000)
    init = jax.jit if concrete else (lambda f: lambda *a: jax.eval_shape(f, *a))
    state = init(lambda p, k: TrainState(step=jnp.int32(0), params=p, ema=jax.tree.map(jnp.copy, p),
                                         opt_state=tx.init(p), rng=k))(s.params, jax.random.PRNGKey(1))  # fmt: skip
    sh = state_shardings(jax.eval_shape(lambda x: x, state), s.p_sh, s.mesh)
    s.params = None  # the state holds its own copy; drop the set-up's (3.4 GB at SD scale)
    step = make_train_step(s.gen, s.text, s.loss_fn, t, tx, lr_fn, 1.0)
    plain_unet = UNet2DConditionModel(s.unet.config, dtype=s.unet.dtype, param_dtype=jnp.float32, remat_policy="none")
    step_nr = make_train_step(Generator(plain_unet, s.gen.schedule), s.text, s.loss_fn, t, tx, lr_fn, 1.0)
    return s, state, sh, step, step_nr


def stage2_parts(size: str, batch: int, remat: str, concrete: bool = True):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from bench.train_step import setup
    from configs import base
    from d2g_jax import sharding as shd
    from d2g_jax.models.unet import UNet2DConditionModel
    from d2g_jax.train.discriminator import Discriminator, abstract_disc_variables, init_disc_params
    from d2g_jax.train.generator import Generator
    from d2g_jax.train.optim import make_optimizer
    from d2g_jax.train.stage2 import make_stage2_step
    from d2g_jax.train.state import TrainState, state_shardings

    s = setup(size, batch, "bfloat16", remat, concrete=concrete)
    disc = Discriminator(s.unet)
    d_boxed = abstract_disc_variables(disc)["params"]
    d_sh = shd.param_shardings(d_boxed, s.mesh)
    if concrete:
        dparams = jax.device_put(init_disc_params(disc, jax.device_get(s.params)), d_sh)
    else:
        dparams = nn.unbox(d_boxed)
    s.n_dparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dparams))
    c = base.get_config()
    c.train.batch_size, c.train.ema_start = batch, 0
    c.disc.r1_interval = 2
    tx, lr_fn = make_optimizer(s.params, lr=1e-4, lr_end=1e-5, num_steps=1000)
    dtx, dlr_fn = make_optimizer(dparams, lr=1e-4, lr_end=1e-5, num_steps=1000)
    init = jax.jit if concrete else (lambda f: lambda *a: jax.eval_shape(f, *a))
    state = init(lambda p, d, k: TrainState(step=jnp.int32(0), params=p, ema=jax.tree.map(jnp.copy, p),
                                            opt_state=tx.init(p), rng=k, disc=d, disc_opt=dtx.init(d)))(
        s.params, dparams, jax.random.PRNGKey(1))  # fmt: skip
    sh = state_shardings(jax.eval_shape(lambda x: x, state), s.p_sh, s.mesh, d_sh)
    s.params = dparams = None  # the state holds its own copies

    def make(gen, d, r1_gamma):
        dc = c.disc.copy_and_resolve_references()
        dc.r1_gamma = r1_gamma
        return make_stage2_step(gen, d, s.text, s.loss_fn, c.train, dc, tx, lr_fn, dtx, dlr_fn, distill_weight=1.0,
                                gan_weight=0.25)  # fmt: skip

    step = make(s.gen, disc, float(c.disc.r1_gamma))
    plain_unet = UNet2DConditionModel(s.unet.config, dtype=s.unet.dtype, param_dtype=jnp.float32, remat_policy="none")
    gen_nr, disc_nr = Generator(plain_unet, s.gen.schedule), Discriminator(plain_unet)
    flop_steps = (make(gen_nr, disc_nr, 0.0), make(gen_nr, disc_nr, float(c.disc.r1_gamma)))
    return s, state, sh, step, flop_steps


def compile_fitting(suite: Suite, kind: str, size: str, batches: list[int], remat: str, limit_gib: float | None):
    """Builds and compiles the step at the first batch whose program fits; returns a namespace or None. A further
    attempt is made only while the time left exceeds the last compile's time plus a margin."""
    from bench.train_step import compile_step

    last = 0.0
    for batch in batches:
        if last and suite.left() < 1.3 * last + 30:
            log(f"{kind}: no time left for batch {batch} (last compile {last:.0f} s, {suite.left():.0f} s left)")
            return None
        log(f"{kind}: building batch {batch} (remat {remat})")
        parts = (stage1_parts if kind == "stage1" else stage2_parts)(size, batch, remat)
        s, state, sh, step = parts[:4]
        try:
            compiled, compile_s, xla_flops, temp_gib = compile_step(step, state, sh, s)
            last = compile_s
        except Exception as e:  # noqa: BLE001 - a compile-time resource error means: try the next batch
            log(f"{kind}: batch {batch} failed to compile ({type(e).__name__}: {str(e)[:300]})")
            del parts, s, state
            gc.collect()
            continue
        ok, need = fits(compiled, limit_gib)
        log(f"{kind}: batch {batch} compiled in {compile_s:.1f} s; XLA peak {need:.1f} GiB of "
            f"{limit_gib if limit_gib else float('nan'):.1f} GiB → {'fits' if ok else 'does not fit'}")  # fmt: skip
        if ok:
            return types.SimpleNamespace(batch=batch, parts=parts, s=s, state=state, sh=sh, compiled=compiled,
                                         compile_s=compile_s, xla_flops=xla_flops, temp_gib=temp_gib,
                                         need_gib=need)  # fmt: skip
        del compiled, parts, s, state
        gc.collect()
    return None


def run_stage1(suite: Suite, size: str, remat: str, peak: float, datasheet: float | None, name: str = "stage1"):
    import jax

    a = suite.args
    limit, _ = device_memory()
    r = compile_fitting(suite, "stage1", size, a.s1_batches, remat, limit)
    if r is None:
        suite.add({"row": name, "error": f"no batch of {a.s1_batches} fits"})
        return None
    s = r.s
    state = r.state
    state, m = r.compiled(state, s.frozen, s.data)
    jax.block_until_ready(m)
    holder = [state]

    def one():
        holder[0], mm = r.compiled(holder[0], s.frozen, s.data)
        return mm

    times = timed(one, a.iters)
    dt = statistics.median(times)
    mf = model_flops(size, "stage1", r.batch)
    if mf is None:  # not precomputed: lower here (minutes at SD scale)
        t0 = time.perf_counter()
        mf = lowered_flops(r.parts[4], abstract(holder[0]), abstract(s.frozen), abstract(s.data))
        log(f"stage1: lowered for FLOPs in {time.perf_counter() - t0:.0f} s")
    _, peak_gib = device_memory()
    row = dict(row=name, size=size, remat=remat, batch=r.batch, params_m=s.n_params / 1e6, compile_s=r.compile_s,
               step_s=dt, step_s_min=min(times), img_s=r.batch / dt, model_tflop=mf / 1e12,
               xla_tflop=r.xla_flops / 1e12, mfu=mf / dt / (peak * 1e12),
               mfu_datasheet=(mf / dt / (datasheet * 1e12)) if datasheet else None,
               hfu=r.xla_flops / dt / (peak * 1e12), xla_peak_gib=r.need_gib, temp_gib=r.temp_gib,
               device_peak_gib=peak_gib, loss=float(jax.device_get(m["loss"])))  # fmt: skip
    suite.add(row)
    log(f"ROW {name}: batch {r.batch} | step {dt:.3f} s | {row['img_s']:.1f} img/s | model {row['model_tflop']:.2f} "
        f"TFLOP (XLA incl. remat {row['xla_tflop']:.2f}) | MFU {100 * row['mfu']:.1f}% of measured peak"
        + (f", {100 * row['mfu_datasheet']:.1f}% of datasheet" if datasheet else "")
        + f" | XLA peak {r.need_gib:.1f} GiB, device peak {peak_gib if peak_gib else float('nan'):.1f} GiB"
        f" | compile {r.compile_s:.0f} s")  # fmt: skip
    r.state = holder[0]
    return r


def run_profile(suite: Suite, r) -> None:
    import jax

    trace_dir = os.path.join(suite.args.out, "trace")
    shutil.rmtree(trace_dir, ignore_errors=True)
    s = r.s
    state = r.state
    jax.profiler.start_trace(trace_dir)
    for _ in range(3):
        state, m = r.compiled(state, s.frozen, s.data)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    r.state = state
    summary = summarize_trace(trace_dir, steps=3)
    with open(os.path.join(suite.args.out, "profile_summary.txt"), "w") as f:
        f.write(summary["text"])
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        gz = os.path.join(suite.args.out, "stage1_trace.xplane.pb.gz")
        with open(path, "rb") as fi, gzip.open(gz, "wb") as fo:
            shutil.copyfileobj(fi, fo)
        if os.path.getsize(gz) > 15 * 2**20:
            os.remove(gz)
            log("profile: trace over 15 MiB compressed; kept only the summary")
    shutil.rmtree(trace_dir, ignore_errors=True)  # the summary and the .gz copy are what comes back
    suite.add({"row": "profile", "batch": r.batch, **{k: v for k, v in summary.items() if k != "text"}})
    print(summary["text"], flush=True)


def _category(name: str, stats: dict) -> str:
    cat = str(stats.get("hlo_category", "") or "")
    n = name.lower()
    if "fmha" in n or "flash" in n or "attention" in n:
        return "attention (cuDNN)"
    if "conv" in n or cat == "convolution":
        return "convolution"
    if "gemm" in n or "dot" in n or "matmul" in n or cat in ("dot", "gemm"):
        return "matmul"
    if cat:
        return cat
    if "fusion" in n:
        return "fusion"
    return n.split(".")[0] or "other"


def summarize_trace(trace_dir: str, steps: int) -> dict:
    """GPU time per XLA op category and the top ops (device plane's "XLA Ops" line) from an xplane trace."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"text": "profile: no trace file written\n"}
    pd = ProfileData.from_file(files[0])
    by_cat, by_op, total = {}, {}, 0.0
    for plane in pd.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name != "XLA Ops":
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                ms = ev.duration_ns / 1e6
                total += ms
                cat = _category(ev.name, stats)
                by_cat[cat] = by_cat.get(cat, 0.0) + ms
                where = str(stats.get("tf_op", "") or stats.get("long_name", "") or "")[:140]
                key = (ev.name, cat, where)
                by_op[key] = by_op.get(key, 0.0) + ms
    if total == 0:
        return {"text": "profile: no device 'XLA Ops' events (CPU run, or the tracer saw no device ops)\n"}
    lines = [f"GPU time in XLA ops over {steps} steps: {total:.1f} ms ({total / steps:.1f} ms/step)", "",
             "| category | ms/step | share |", "|---|---|---|"]  # fmt: skip
    cats = sorted(by_cat.items(), key=lambda kv: -kv[1])
    lines += [f"| {c} | {ms / steps:.1f} | {100 * ms / total:.1f}% |" for c, ms in cats]
    lines += ["", "| op | category | ms/step | share | JAX op |", "|---|---|---|---|---|"]
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:25]
    lines += [f"| {k[0]} | {k[1]} | {ms / steps:.2f} | {100 * ms / total:.1f}% | {k[2]} |" for k, ms in ops]
    return {"text": "\n".join(lines) + "\n", "device_ms_per_step": total / steps,
            "categories": {c: ms / steps for c, ms in cats}}  # fmt: skip


def run_stage2(suite: Suite, size: str, remat: str, peak: float, datasheet: float | None):
    a = suite.args
    limit, _ = device_memory()
    r = compile_fitting(suite, "stage2", size, a.s2_batches, remat, limit)
    if r is None:
        suite.add({"row": "stage2", "error": f"no batch of {a.s2_batches} fits"})
        return
    s = r.s
    holder = [r.state]

    def one():
        holder[0], mm = r.compiled(holder[0], s.frozen, s.data)
        return mm

    timed(one, 2)  # warm-up: one R1 step, one plain step
    plain, r1 = [], []
    for _ in range(a.iters):
        r1 += timed(one, 1)  # the state's step is even here → R1 due (interval 2)
        plain += timed(one, 1)
    dt, dt_r1 = statistics.median(plain), statistics.median(r1)
    amortised = (15 * dt + dt_r1) / 16
    f_plain, extra = model_flops(size, "stage2_plain", r.batch), model_flops(size, "stage2_r1_extra", r.batch)
    if f_plain is None or extra is None:  # not precomputed: lower here (minutes at SD scale)
        args = (abstract(holder[0]), abstract(s.frozen), abstract(s.data))
        f_plain = lowered_flops(r.parts[4][0], *args)
        extra = lowered_flops(r.parts[4][1], *args) - f_plain  # the R1 lax.cond counts both branches
    f_full = f_plain + extra
    flops = f_plain + extra / 16
    _, peak_gib = device_memory()
    row = dict(row="stage2", size=size, remat=remat, batch=r.batch, params_m=s.n_params / 1e6,
               dparams_m=s.n_dparams / 1e6, compile_s=r.compile_s, step_s=dt, r1_step_s=dt_r1,
               amortised_s=amortised, img_s=r.batch / amortised, model_tflop_plain=f_plain / 1e12,
               model_tflop_r1_extra=(f_full - f_plain) / 1e12, model_tflop_amortised=flops / 1e12,
               mfu=flops / amortised / (peak * 1e12),
               mfu_datasheet=(flops / amortised / (datasheet * 1e12)) if datasheet else None,
               xla_peak_gib=r.need_gib, temp_gib=r.temp_gib, device_peak_gib=peak_gib)  # fmt: skip
    suite.add(row)
    log(f"ROW stage2: batch {r.batch} | step {dt:.3f} s, R1 step {dt_r1:.3f} s, R1/16 amortised {amortised:.3f} s | "
        f"{row['img_s']:.1f} img/s | model {flops / 1e12:.2f} TFLOP | MFU {100 * row['mfu']:.1f}% | XLA peak "
        f"{r.need_gib:.1f} GiB, device peak {peak_gib if peak_gib else float('nan'):.1f} GiB | compile "
        f"{r.compile_s:.0f} s")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Sampling


def build_sampler(size: str, root: str, dtype: str):
    """A OneStepSampler over a random SD1.5-architecture U-Net (initialised on the device), SD's VAE decoder and a
    12-layer CLIP-shaped text encoder written in diffusers format (no 3.4 GB U-Net file written or read)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from bench.train_step import random_tree, unet_config
    from d2g_jax import sharding as shd
    from d2g_jax.generate import OneStepSampler
    from d2g_jax.models.text import TextEncoder
    from d2g_jax.models.tiny import TINY_UNET, TINY_VAE, write_tiny_pipeline
    from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables
    from d2g_jax.models.vae import VAEConfig, load_vae
    from d2g_jax.sampling import DDIMSchedule, _vae_scale_factor
    from d2g_jax.train.generator import Generator

    cfg, side = unet_config(size)
    ctx = cfg.cross_attention_dim[0]
    if size == "tiny":
        vae, layers = TINY_VAE, 2
    else:
        vae, layers = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32), 12
    folder = os.path.join(root, f"pipe_{size}")
    shutil.rmtree(folder, ignore_errors=True)
    small = dataclasses.replace(TINY_UNET, cross_attention_dim=(ctx, ctx))  # written only for the folder's sake
    write_tiny_pipeline(folder, unet=small, vae=vae, text_layers=layers)
    mesh = shd.make_mesh(-1, 1)
    unet = UNet2DConditionModel(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    boxed = abstract_variables(unet)["params"]
    p_sh = shd.param_shardings(boxed, mesh)
    abstract_params = nn.unbox(boxed)
    params = jax.jit(lambda k: random_tree(abstract_params, k), out_shardings=p_sh)(jax.random.PRNGKey(0))
    schedule = DDIMSchedule.from_pipeline(folder)
    vsf = _vae_scale_factor(folder)
    vae_mod, vae_vars = load_vae(folder, parts=("decoder",), dtype=jnp.float32)
    vae_vars = shd.replicate(vae_vars, mesh)
    text = TextEncoder.from_pipeline(folder, dtype=jnp.dtype(dtype))
    return OneStepSampler(Generator(unet, schedule, vsf), params, text, (vae_mod, vae_vars), mesh,
                          (side, side, cfg.in_channels), 1, schedule, params, "random")  # fmt: skip


def run_sampling(suite: Suite, sampler, batch: int, steps: int) -> None:
    import numpy as np

    from d2g_jax.generate import noise_for_seeds

    a = suite.args
    s = dataclasses.replace(sampler, batch_size=batch)  # a fresh instance: its own jitted functions
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    z = noise_for_seeds(list(range(batch)), s.latent_shape)
    res = s.latent_shape[0] * s.gen.vae_scale_factor
    t0 = time.perf_counter()
    img = s.images(z, prompts)
    c_s = time.perf_counter() - t0
    assert img.shape == (batch, res, res, 3) and img.dtype == np.uint8, img.shape
    st = statistics.median(timed(lambda: s.images(z, prompts), a.iters))
    log(f"sample b{batch}: student {st:.4f} s/batch (first call {c_s:.1f} s)")
    t0 = time.perf_counter()
    s.teacher_images(z, prompts, 3.0, steps)
    c_t = time.perf_counter() - t0
    tt = statistics.median(timed(lambda: s.teacher_images(z, prompts, 3.0, steps), max(1, a.iters // 2)))
    row = dict(row=f"sample_b{batch}", res=res, batch=batch, steps=steps, student_s=st, teacher_s=tt,
               student_s_per_img=st / batch, teacher_s_per_img=tt / batch, speedup=tt / st,
               student_compile_s=c_s, teacher_compile_s=c_t)  # fmt: skip
    suite.add(row)
    log(f"ROW sample_b{batch}: {res} px | student {st:.4f} s ({st / batch:.4f} s/img) | teacher {steps}-step CFG "
        f"{tt:.3f} s ({tt / batch:.4f} s/img) | {tt / st:.1f}× | paper A100 b1: 0.09 vs 2.59 s (28.8×)")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="sd15", choices=("tiny", "mid", "sd15"), help="one size per run")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_suite"))
    p.add_argument("--rows", default="peak,stage1,profile,stage2,sample1,sample8,variant")
    p.add_argument("--s1_batches", default="32,16,8")
    p.add_argument("--s2_batches", default="32,16,8")
    p.add_argument("--remat", default="nothing_saveable")
    p.add_argument("--variants", default="none", help="remat policies for the variant row (comma-separated)")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budget_s", type=float, default=560.0)
    p.add_argument("--cache_dir", default="/root/.cache/d2g_jax_xla")
    p.add_argument("--flops_only", action="store_true", help="write bench/gpu_suite_flops.json (any machine)")
    args = p.parse_args()
    args.s1_batches = [int(b) for b in args.s1_batches.split(",")]
    args.s2_batches = [int(b) for b in args.s2_batches.split(",")]
    rows = args.rows.split(",")
    tiny = args.sizes == "tiny"
    if tiny or args.flops_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import flax

    if args.flops_only:
        return flops_only(args)
    kind = jax.devices()[0].device_kind
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in kind), None)
    suite = Suite(args)
    limit, _ = device_memory()
    suite.meta = dict(device=kind, count=jax.device_count(), backend=jax.default_backend(), jax=jax.__version__,
                      flax=flax.__version__, size=args.sizes, date=time.strftime("%Y-%m-%d"), mem_limit_gib=limit,
                      argv=sys.argv[1:])  # fmt: skip
    log(f"device {kind} ×{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}, flax "
        f"{flax.__version__}, allocator limit {limit if limit else float('nan'):.1f} GiB, out {args.out}")  # fmt: skip

    def guarded(name, fn):
        if name not in rows or not suite.affordable(name):
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            traceback.print_exc()
            suite.add({"row": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
            log(f"ERROR in {name}: {type(e).__name__}: {str(e)[:500]}")
            return None

    peak = guarded("peak", lambda: measure_peak(tiny))
    if peak:
        suite.add({"row": "peak", "bf16_matmul_tflops": peak, "datasheet_tflops": datasheet})
        log(f"ROW peak: bf16 matmul {peak:.1f} TFLOP/s measured (datasheet {datasheet})")
    peak = peak or datasheet or 1.0
    # Stage 2 first: the longest compile and the fewer-GPU recipe; its autotuned convolutions (the same U-Net
    # shapes) are then reused by stage 1's compile in this process.
    guarded("stage2", lambda: run_stage2(suite, args.sizes, args.remat, peak, datasheet))
    gc.collect()
    r1 = guarded("stage1", lambda: run_stage1(suite, args.sizes, args.remat, peak, datasheet))
    if r1 is not None:
        guarded("profile", lambda r=r1: run_profile(suite, r))
    best_s1 = r1.batch if r1 is not None else None
    del r1
    gc.collect()
    if "sample1" in rows or "sample8" in rows:
        holder = {}

        def sampler():
            if "s" not in holder:
                holder["s"] = build_sampler(args.sizes, args.out + "_pipe", "bfloat16")
            return holder["s"]

        guarded("sample1", lambda: run_sampling(suite, sampler(), 1, args.steps))
        guarded("sample8", lambda: run_sampling(suite, sampler(), 8, args.steps))
        holder.clear()
        shutil.rmtree(args.out + "_pipe", ignore_errors=True)
        gc.collect()
    for policy in args.variants.split(",") if "variant" in rows else []:
        if best_s1:
            args.s1_batches = [best_s1]
        guarded("variant", lambda policy=policy: run_stage1(suite, args.sizes, policy, peak, datasheet,
                                                          name=f"stage1_remat_{policy}"))  # fmt: skip
        gc.collect()
    log(f"done; {len(suite.rows)} rows in {suite.path}")


if __name__ == "__main__":
    main()
