"""Regression-loss cost, paper §3.2 / Fig. 4: E-LatentLPIPS (JAX) vs the official elatentlpips (PyTorch) vs
pixel LPIPS with VAE decoding (JAX), forward + backward, side by side in one run.

    python bench/loss.py [--batch 8] [--pixel_batch 1] [--iters 3] [--device cpu|gpu]

Random weights are written once in the real formats: the two official E-LatentLPIPS files (`ckpt/sd15_*`), a
torchvision-format VGG16 + LPIPS-format heads, and a diffusers `vae/` folder with SD1.5's VAE config
(83.7M parameters, 4×64×64 latents → 3×512×512 images). Each case then runs in its own subprocess (so its
memory is its own): load, compile/warm up, time `--iters` iterations of `d loss / d x0` for
`loss = mean(d(x0, x1))` on `[batch, 64, 64, 4]` latents (x1, the target, gets no gradient), preset `bgco` with
the L1 term (E-LatentLPIPS) or no augmentation (LatentLPIPS rows).

Memory ("extra", i.e. beyond weights and inputs):
  * JAX: XLA's buffer assignment for the compiled step, `compiled.memory_analysis().temp_size_in_bytes`
    (exact for the program, independent of the allocator), and on CPU the process peak-RSS increase during
    the timed iterations (VmHWM reset through /proc/self/clear_refs before them); on GPU `peak_bytes_in_use`;
  * PyTorch: on CPU the same peak-RSS increase; on GPU `torch.cuda.max_memory_allocated` minus the allocation
    before the iterations.
On CPU the SD1.5 VAE decoder is too slow to time at batch 8 (~20 s per image forward on 2 cores), so the pixel
path is timed at `--pixel_batch` and its per-batch time extrapolated linearly (marked "≈"); its XLA memory is
still compiled (not run) at the full batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"elatent_ms": 12.1, "pixel_ms": 117.0, "elatent_gb": 0.6, "pixel_gb": 15.0}  # A100, Fig. 4 / §3.2
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- weights


def make(folder: str) -> None:
    """Random weights in the official/torchvision/LPIPS/diffusers formats (torch is only used here)."""
    import torch
    from diffusers import AutoencoderKL

    sys.path.insert(0, ROOT)
    from d2g_jax.losses.latent_vgg import vgg_layers

    g = torch.Generator().manual_seed(0)

    def features(cin: int, bn: bool) -> dict:
        sd = {}
        for kind, i, ch in vgg_layers(bn):
            if kind == "conv":
                sd[f"{i}.weight"] = torch.randn(ch, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
                sd[f"{i}.bias"] = torch.randn(ch, generator=g) * 0.1
                cin = ch
            elif kind == "bn":
                sd[f"{i}.weight"] = 0.5 + torch.rand(ch, generator=g)
                sd[f"{i}.bias"] = torch.randn(ch, generator=g) * 0.2
                sd[f"{i}.running_mean"] = torch.randn(ch, generator=g) * 0.3
                sd[f"{i}.running_var"] = 0.3 + 1.7 * torch.rand(ch, generator=g)
                sd[f"{i}.num_batches_tracked"] = torch.tensor(1)
        return sd

    classifier = {"0.weight": (4096, 25088), "0.bias": (4096,), "3.weight": (4096, 4096), "3.bias": (4096,),
                  "6.weight": (1000, 4096), "6.bias": (1000,)}  # fmt: skip
    cls = {k: torch.zeros(()).expand(s) for k, s in classifier.items()}  # real shapes, 4-byte storages
    heads = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 128, 256, 512, 512))
    }
    os.makedirs(os.path.join(folder, "ckpt"), exist_ok=True)
    trunk = {f"module.model.features.{k}": v for k, v in features(4, True).items()}
    trunk.update({f"module.model.classifier.{k}": v for k, v in cls.items()})
    torch.save({"state_dict": trunk, "best_acc1": torch.tensor(0.0)}, f"{folder}/ckpt/sd15_latent_vgg16.pth.tar")
    slices = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))
    tuned = {}
    for k, v in features(4, True).items():
        s = next(n for n, (a, b) in enumerate(slices, 1) if a <= int(k.split(".")[0]) < b)
        tuned[f"net.slice{s}.{k}"] = v
    for k, v in heads.items():
        tuned[k], tuned["lins." + k[3:]] = v, v
    torch.save(tuned, f"{folder}/ckpt/sd15_latest_vgg16_tuned.pth")
    tv = {f"features.{k}": v for k, v in features(3, False).items()}
    tv.update({f"classifier.{k}": v for k, v in cls.items()})
    torch.save(tv, f"{folder}/vgg16.pth", _use_new_zipfile_serialization=False)
    torch.save(heads, f"{folder}/lpips_vgg.pth", _use_new_zipfile_serialization=False)
    torch.manual_seed(0)
    AutoencoderKL(**SD15_VAE).save_pretrained(f"{folder}/vae")


def inputs(batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((batch, 64, 64, 4)).astype(np.float32)
    x0 = (x1 + 0.5 * rng.standard_normal(x1.shape)).astype(np.float32)
    return x0, x1


# ---------------------------------------------------------------------------------------------- memory


def _rss_status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB → GiB
    return float("nan")


def _reset_peak_rss() -> float:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _rss_status("VmRSS")


# ---------------------------------------------------------------------------------------------- cases


def run_jax(folder: str, case: str, batch: int, pixel_batch: int, iters: int) -> dict:
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from d2g_jax.losses.elatentlpips import e_latent_lpips, load_latent_lpips, pixel_lpips, vae_decoder
    from d2g_jax.losses.latent_vgg import load_pixel_lpips

    t0 = time.perf_counter()
    if case == "pixel":
        from d2g_jax.models.vae import load_vae

        vae, vae_vars = load_vae(f"{folder}/vae", parts=("decoder",))
        _, variables = load_pixel_lpips(f"{folder}/vgg16.pth", f"{folder}/lpips_vgg.pth")
        decode = vae_decoder(vae, jax.device_put(vae_vars))
        loss = lambda v, x0, x1, key: jnp.mean(pixel_lpips(v, x0, x1, decode))  # noqa: E731
        run_batch = pixel_batch
    else:
        _, variables = load_latent_lpips(f"{folder}/ckpt", "sd15")
        mode = "ensemble" if case == "elatent" else "plain"
        loss = lambda v, x0, x1, key: jnp.mean(  # noqa: E731
            e_latent_lpips(v, x0, x1, key, preset="bgco", mode=mode, l1=True)
        )
        run_batch = batch
    variables = jax.device_put(variables)
    load_s = time.perf_counter() - t0
    step = jax.jit(jax.value_and_grad(loss, argnums=1))
    key = jax.random.PRNGKey(0)
    full = [jnp.asarray(a) for a in inputs(batch)]
    t0 = time.perf_counter()
    compiled = step.lower(variables, *full, key).compile()
    mem = compiled.memory_analysis()
    x0, x1 = (jnp.asarray(a[:run_batch]) for a in inputs(batch))
    if run_batch != batch:
        compiled = step.lower(variables, x0, x1, key).compile()
    compile_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    # Peak memory of the first execution (compilation done, nothing cached by the allocator yet).
    base = _reset_peak_rss() if dev.platform == "cpu" else dev.memory_stats()["bytes_in_use"]
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, x0, x1, key))
    warm = time.perf_counter() - t0
    if dev.platform == "cpu":
        extra = _rss_status("VmHWM") - base
    else:
        extra = (dev.memory_stats()["peak_bytes_in_use"] - base) / 2**30
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        val, grad = compiled(variables, x0, x1, jax.random.fold_in(key, i))
        jax.block_until_ready(grad)
        times.append(time.perf_counter() - t0)
    assert np.isfinite(float(val)) and bool(jnp.all(jnp.isfinite(grad)))
    return dict(load_s=load_s, compile_s=compile_s, warm_s=warm, iter_s=statistics.median(times),
                run_batch=run_batch, xla_temp_gib=mem.temp_size_in_bytes / 2**30, extra_gib=extra)  # fmt: skip


def _guarded(init, name):
    def call():
        try:
            return init()
        except Exception as e:  # noqa: BLE001 - report and use the reference path
            print(f"elatentlpips: CUDA plugin for {name} unavailable ({type(e).__name__}); reference ops", file=sys.stderr)
            return False

    return call


def run_torch(folder: str, case: str, batch: int, iters: int, device: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import elatentlpips

    dev = "cuda" if device == "gpu" else "cpu"
    if dev == "cuda":
        # StyleGAN's upfirdn2d/bias_act CUDA plugins are compiled at first use (nvcc + ninja + headers); when that
        # fails the official package raises instead of falling back, so fall back to its own reference ('ref') ops.
        from elatentlpips.style_ops import upfirdn2d  # the only plugin its augmentations use

        upfirdn2d._init = _guarded(upfirdn2d._init, upfirdn2d.__name__)
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(folder)  # the official package reads ./ckpt/
    try:
        model = elatentlpips.ELatentLPIPS(pretrained=True, encoder="sd15", augment="bgco", verbose=False)
    finally:
        os.chdir(cwd)
    model = model.eval().to(dev)
    load_s = time.perf_counter() - t0
    x0, x1 = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(dev) for a in inputs(batch))
    ens = case == "elatent"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        a = x0.clone().requires_grad_(True)
        loss = model(a, x1, ensembling=ens, add_l1_loss=True).mean()
        loss.backward()
        sync()
        return a.grad

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    t0 = time.perf_counter()
    step()  # peak memory of the first step, like JAX's
    warm = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev == "cuda" else _rss_status("VmHWM") - base
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        g = step()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(g).all()
    return dict(load_s=load_s, compile_s=0.0, warm_s=warm, iter_s=statistics.median(times), run_batch=batch,
                extra_gib=extra)  # fmt: skip


# ---------------------------------------------------------------------------------------------- driver


def _child(args) -> None:
    if args.framework == "jax":
        res = run_jax(args.folder, args.case, args.batch, args.pixel_batch, args.iters)
    else:
        res = run_torch(args.folder, args.case, args.batch, args.iters, args.device)
    print("RESULT " + json.dumps(res))


def _spawn(args, framework: str, case: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--framework", framework, "--case", case,
           "--folder", args.folder, "--batch", str(args.batch), "--pixel_batch", str(args.pixel_batch),
           "--iters", str(args.iters), "--device", args.device]  # fmt: skip
    env = dict(os.environ)
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"{framework}/{case} failed:\n{out.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pixel_batch", type=int, default=None, help="batch actually run for pixel LPIPS "
                   "(default: 1 on cpu, --batch on gpu); time is scaled to --batch")  # fmt: skip
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--cases", default="jax/elatent,torch/elatent,jax/plain,torch/plain,jax/pixel")
    p.add_argument("--folder", default=None, help="weights folder to write (or reuse); default: a temp dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--framework", default="jax", help=argparse.SUPPRESS)
    p.add_argument("--case", default="elatent", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pixel_batch is None:
        args.pixel_batch = 1 if args.device == "cpu" else args.batch
    if args.child:
        return _child(args)
    tmp = None
    if args.folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loss_")
        args.folder = tmp.name
    if not os.path.isdir(os.path.join(args.folder, "vae")):
        print(f"writing random weights to {args.folder} ...", file=sys.stderr, flush=True)
        make(args.folder)
    rows = {}
    for item in args.cases.split(","):
        fw, case = item.split("/")
        print(f"running {fw}/{case} ...", file=sys.stderr, flush=True)
        rows[(fw, case)] = _spawn(args, fw, case)
    b = args.batch
    names = {"elatent": "E-LatentLPIPS (bgco + L1)", "plain": "LatentLPIPS (no aug, + L1)",
             "pixel": "LPIPS pixel (SD1.5 VAE decode + VGG16)"}  # fmt: skip
    paper = {("jax", "elatent"): f"{PAPER['elatent_ms']} ms / {PAPER['elatent_gb']} GB",
             ("jax", "pixel"): f"{PAPER['pixel_ms']} ms / {PAPER['pixel_gb']} GB"}  # fmt: skip
    print(f"\nLoss forward+backward (d/dx0), batch {b}, 4×64×64 latents, device {args.device}, {args.iters} iters\n")
    print("| loss | framework | ms / iter (batch %d) | XLA temp GiB | peak extra GiB (measured) | paper A100 |" % b)
    print("|---|---|---|---|---|---|")
    per = {}
    for (fw, case), r in rows.items():
        ms = r["iter_s"] * 1e3 * b / r["run_batch"]
        per[(fw, case)] = ms
        approx = "" if r["run_batch"] == b else f"≈ (run at batch {r['run_batch']}) "
        xla = f"{r['xla_temp_gib']:.3f}" if "xla_temp_gib" in r else "–"
        extra = f"{r['extra_gib']:.3f}" + ("" if r["run_batch"] == b else f" (batch {r['run_batch']})")
        print(f"| {names[case]} | {fw} | {approx}{ms:.1f} | {xla} | {extra} | {paper.get((fw, case), '–')} |")
    print()
    ratios = (("E-LatentLPIPS, PyTorch / JAX time", ("torch", "elatent"), ("jax", "elatent")),
              ("LatentLPIPS, PyTorch / JAX time", ("torch", "plain"), ("jax", "plain")),
              ("pixel LPIPS / E-LatentLPIPS time (JAX)", ("jax", "pixel"), ("jax", "elatent")))  # fmt: skip
    for name, num, den in ratios:
        if num in per and den in per:
            print(f"* {name}: {per[num] / per[den]:.2f}×")
    if ("jax", "pixel") in rows and ("jax", "elatent") in rows:
        mem = rows[("jax", "pixel")]["xla_temp_gib"] / rows[("jax", "elatent")]["xla_temp_gib"]
        paper_t, paper_m = PAPER["pixel_ms"] / PAPER["elatent_ms"], PAPER["pixel_gb"] / PAPER["elatent_gb"]
        print(f"* pixel LPIPS / E-LatentLPIPS XLA temp memory (JAX): {mem:.1f}×; paper: time {paper_t:.1f}×, "
              f"memory {paper_m:.0f}×")  # fmt: skip
    steps = [f"{fw}/{c} {r['load_s']:.1f}/{r['compile_s']:.1f}/{r['warm_s']:.1f}" for (fw, c), r in rows.items()]
    print("* load / compile / first step s: " + ", ".join(steps))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
