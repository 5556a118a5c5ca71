"""Full-size SD1.5 U-Net forward: Flax (jit) vs diffusers PyTorch, same batch, side by side in one run.

    python bench/unet_forward.py [--batch 1] [--iters 3] [--jax_dtypes float32,bfloat16] [--device cpu|gpu]

Random weights in the SD1.5 architecture (diffusers defaults = SD1.5's unet/config.json) are written once in
the real diffusers format; each framework then runs in its own subprocess (so peak RSS is its own) that loads
that folder, warms up (JAX: compile) and times `--iters` forwards of a 4×64×64 latent with a 77×768 context.
Prints a markdown table with load time, compile/warm-up, median forward time, peak memory and the ratios.
Peak memory: process max RSS on CPU; on GPU, torch.cuda.max_memory_allocated and XLA's peak_bytes_in_use.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make(folder: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # diffusers' defaults are SD1.5's U-Net (cross_attention_dim 768, attention_head_dim 8, 4 blocks).
    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).save_pretrained(folder)


def inputs(batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 64, 64, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, 77, 768)).astype(np.float32)
    t = np.full((batch,), 999.0, np.float32)
    return x, t, ctx


def run_torch(folder: str, batch: int, iters: int, device: str, threads: int, dtype: str = "float32") -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    dev = "cuda" if device == "gpu" else "cpu"
    t0 = time.perf_counter()
    tdtype = getattr(torch, dtype)
    model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=tdtype).eval().to(dev)
    load_s = time.perf_counter() - t0
    x, t, ctx = inputs(batch)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev, tdtype)
    t, ctx = torch.from_numpy(t).to(dev), torch.from_numpy(ctx).to(dev, tdtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x, t, ctx)
        sync()
        warm = time.perf_counter() - t0
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x, t, ctx)
            sync()
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else _rss_gib()
    return dict(load_s=load_s, warm_s=warm, fwd_s=statistics.median(times), peak_gib=mem)


def run_jax(folder: str, batch: int, iters: int, dtype: str, device: str) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from d2g_jax.models.unet import load_unet

    t0 = time.perf_counter()
    module, variables = load_unet(folder, dtype=getattr(jnp, dtype), param_dtype=jnp.float32)
    variables = jax.device_put(variables)
    jax.block_until_ready(variables)
    load_s = time.perf_counter() - t0
    x, t, ctx = (jax.device_put(a) for a in inputs(batch))
    fwd = jax.jit(module.apply)
    t0 = time.perf_counter()
    fwd(variables, x, t, ctx).block_until_ready()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fwd(variables, x, t, ctx).block_until_ready()
        times.append(time.perf_counter() - t0)
    if device == "gpu":
        # The allocator's peak includes compile-time autotuning scratch (cuDNN/GEMM algorithm search), which is
        # not what a forward holds; report the compiled program's own footprint (arguments + temporaries + output)
        # as the peak and keep the allocator figure beside it.
        ma = fwd.lower(variables, x, t, ctx).compile().memory_analysis()
        mem = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**30
        alloc = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30
        print(f"jax {dtype}: allocator peak incl. autotuning {alloc:.2f} GiB", file=sys.stderr)
    else:
        mem = _rss_gib()
    return dict(load_s=load_s, warm_s=warm, fwd_s=statistics.median(times), peak_gib=mem)


def _child(args, role, dtype=None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--role",
        role,
        "--folder",
        args.folder,
        "--batch",
        str(args.batch),
        "--iters",
        str(args.iters),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if dtype:
        cmd += ["--dtype", dtype]
    env = dict(os.environ)
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    sys.stderr.write("".join(ln + "\n" for ln in out.stderr.splitlines() if "allocator peak" in ln))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", default="parent", choices=["parent", "torch", "jax"])
    p.add_argument("--folder", default="")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--jax_dtypes", default="float32,bfloat16")
    p.add_argument("--torch_dtypes", default="float32", help="e.g. float32,bfloat16 on GPU")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    if args.role == "torch":
        print(json.dumps(run_torch(args.folder, args.batch, args.iters, args.device, args.threads, args.dtype)))
        return
    if args.role == "jax":
        print(json.dumps(run_jax(args.folder, args.batch, args.iters, args.dtype, args.device)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if not args.folder:
            args.folder = os.path.join(tmp, "unet")
            t0 = time.perf_counter()
            make(args.folder)
            print(f"wrote random SD1.5 U-Net to {args.folder} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        rows = [(f"diffusers PyTorch {dt}", _child(args, "torch", dt)) for dt in args.torch_dtypes.split(",")]
        for dt in args.jax_dtypes.split(","):
            rows.append((f"d2g_jax Flax jit {dt}", _child(args, "jax", dt)))
    base = rows[0][1]
    print(
        f"\nSD1.5 U-Net forward, batch {args.batch}, 4x64x64 latent, 77x768 context, device={args.device}, "
        f"threads={args.threads}, median of {args.iters}\n"
    )
    cols = ["implementation", "load (s)", "first call (s)", "forward (s)", "time vs PyTorch", "peak mem (GiB)"]
    print("| " + " | ".join(cols + ["mem vs PyTorch"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['load_s']:.2f} | {r['warm_s']:.2f} | {r['fwd_s']:.3f} | "
            f"{r['fwd_s'] / base['fwd_s']:.2f}x | {r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
