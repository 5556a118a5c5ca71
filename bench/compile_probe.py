"""What the MNIST job's fixed costs are: the compile time and the steady time of configs/mnist.py's stage-1 and
stage-2 steps (the trainers' own jitted `step_fn`, lowered and compiled explicitly), under XLA flag variants, each
variant in its own process, interleaved over `--rounds`.

    python bench/compile_probe.py [--variants parts,no_parts,opt1,noexp] [--rounds 1] [--iters 6] [--pairs DIR]

Stage 2's step (G forward+backward, E-LatentLPIPS*, D on 2B rows, the lazy-R1 double backward under `lax.cond`,
both updates) compiles ~4× longer than stage 1's (BENCHMARKS.md); on a 2-core CPU that is minutes of the
Quickstart's 30. Variants (XLA_FLAGS on top of 2 host devices, configs/mnist.py's setting):
* base: XLA's defaults, configs/mnist.py as it is;
* opt1 / opt0: `--xla_backend_optimization_level=1 / 0` (LLVM's optimisation level for the CPU code);
* noexp: `--xla_llvm_disable_expensive_passes=true`;
* parts / no_parts: XLA's defaults, `config.stage2.log_grad_parts` True / False (G's distillation and GAN gradients
  pulled back through G apart, their norms logged / their sum pulled back once).
The table's ratios are against the first variant listed.
Each prints one JSON line: compile seconds and the median step seconds (stage 2: steps alternate R1-due / not, so
the median is a no-R1 step's), measured after compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

# variant → (XLA flags added to 2 host devices, config overrides)
VARIANTS = {
    "base": ("", {}),
    "opt1": ("--xla_backend_optimization_level=1", {}),
    "opt0": ("--xla_backend_optimization_level=0", {}),
    "noexp": ("--xla_llvm_disable_expensive_passes=true", {}),
    "parts": ("", {"stage2.log_grad_parts": True}),
    "no_parts": ("", {"stage2.log_grad_parts": False}),
}


def child(a) -> None:
    import shutil

    import jax
    import numpy as np
    from absl import logging
    from step_profile import load_config

    from d2g_jax import console, pipeline
    from d2g_jax import sharding as shd

    console.setup(False)
    logging.set_verbosity(logging.WARNING)
    config = load_config(a.workdir, a.pairs)
    for k, v in VARIANTS[a.child][1].items():
        sec, field = k.split(".")
        config[sec][field] = v
    tw = os.path.join(a.workdir, f"run_{os.getpid()}")
    shutil.rmtree(tw, ignore_errors=True)
    out = {"variant": a.child, "devices": jax.device_count()}
    for stage in ("stage1", "stage2"):
        tr = pipeline.make_trainer(config, tw, stage)
        if stage == "stage2":  # G and EMA from the teacher: no stage-1 checkpoint needed (same cost)

            def teacher(tr=tr):
                return shd.put_global(tr.init_params, tr.param_sh)

            tr._restore_stage1 = lambda teacher=teacher: (teacher(), teacher(), 0)
        st = tr.initial_state()
        batch = jax.block_until_ready(tr.global_batch(next(tr.loader)))
        t0 = time.perf_counter()
        fn = tr.step_fn.lower(st, tr.frozen, batch).compile()
        out[f"{stage}_compile_s"] = time.perf_counter() - t0
        times = []
        for i in range(a.iters + 1):
            t0 = time.perf_counter()
            st, m = fn(st, tr.frozen, batch)
            jax.block_until_ready(m)
            if i:
                times.append(time.perf_counter() - t0)
        out[f"{stage}_step_s"] = float(np.median(times))
        print(json.dumps(out), flush=True)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="parts,no_parts,opt1,noexp")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--workdir", default="/tmp/d2g_compile_probe")
    ap.add_argument("--pairs", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    from step_profile import ensure_pairs

    os.makedirs(a.workdir, exist_ok=True)
    a.pairs = os.path.abspath(a.pairs) if a.pairs else ensure_pairs(a.workdir, 512)
    res: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for v in a.variants.split(","):
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {VARIANTS[v][0]}".strip())  # fmt: skip
            cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--workdir", a.workdir, "--pairs", a.pairs,
                   "--iters", str(a.iters)]  # fmt: skip
            print(f"[{time.strftime('%H:%M:%S')}] round {r} {v}: XLA_FLAGS={env['XLA_FLAGS']}", flush=True)
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(p.stdout[-2000:], p.stderr[-3000:], flush=True)
                raise SystemExit(f"variant {v} failed")
            rec = json.loads(line[7:])
            print("  " + json.dumps(rec), flush=True)
            res.setdefault(v, []).append(rec)
    ref = next(iter(res))
    print("\n| variant | stage-1 compile (s) | stage-1 step (ms) | stage-2 compile (s) | stage-2 step (ms) |")
    print("|---|---|---|---|---|")
    med = lambda v, k: sorted(x[k] for x in res[v])[len(res[v]) // 2]
    for v in res:
        cells = []
        keys = (("stage1_compile_s", 1), ("stage1_step_s", 1e3), ("stage2_compile_s", 1), ("stage2_step_s", 1e3))
        for k, scale in keys:
            s = f"{med(v, k) * scale:.1f}"
            if v != ref:
                s += f" ({med(v, k) / med(ref, k):.2f}×)"
            cells.append(s)
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
