"""Sampling speed: the one-step student vs the teacher's 50-step DDIM ODE with CFG, side by side (paper Table 3:
0.09 s vs 2.59 s per 512-px SD1.5 image on an A100, 28.8×).

    python bench/sample.py [--sizes tiny,mid] [--device cpu|gpu] [--batch 4] [--iters 3] [--steps 50]

Both rows run `d2g_jax.generate.OneStepSampler` — the code behind `--config.mode=sample` — on one random-weight
pipeline written in diffusers format: prompts → text encoder → U-Net (student: one call at T = 999; teacher:
`--steps` DDIM steps, each one U-Net call on the [uncond; cond] batch, CFG 3) → VAE decode → uint8 images, one
jitted function each, batch split over the devices. Sizes:

* tiny: the tiny config's pipeline (16×16 latents, 64-px images);
* mid:  SD1.5-shaped U-Net at 40% width on 32×32 latents, SD's VAE decoder (256-px images), CLIP-L-sized text;
* sd15: the SD1.5 U-Net (860M), SD's VAE, 64×64 latents → 512-px images (the paper's setting; GPU).

Times are medians over `--iters` calls after one compile call; s/image = time / batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.timing import time_calls  # noqa: E402


def pipeline_folder(size: str, root: str) -> tuple[str, int]:
    from d2g_jax.models.tiny import TINY_UNET, TINY_VAE, write_tiny_pipeline
    from d2g_jax.models.unet_config import UNetConfig
    from d2g_jax.models.vae import VAEConfig

    sd15 = UNetConfig.from_diffusers({"cross_attention_dim": 768, "sample_size": 64})
    sd_vae = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    if size == "tiny":
        unet, vae, text_layers, res = TINY_UNET, TINY_VAE, 2, 64
    elif size == "mid":
        unet = dataclasses.replace(sd15, block_out_channels=(128, 256, 512, 512), sample_size=32)
        vae, text_layers, res = sd_vae, 12, 256
    elif size == "sd15":
        unet, vae, text_layers, res = sd15, sd_vae, 12, 512
    else:
        raise ValueError(size)
    folder = os.path.join(root, size)
    write_tiny_pipeline(folder, unet=unet, vae=vae, text_layers=text_layers)
    return folder, res


def run(size: str, batch: int, iters: int, steps: int, dtype: str, root: str) -> dict:
    import jax
    import numpy as np

    from d2g_jax import sharding as shd
    from d2g_jax.generate import OneStepSampler, noise_for_seeds

    folder, res = pipeline_folder(size, root)
    mesh = shd.make_mesh(-1, 1)
    s = OneStepSampler.load(folder, os.path.join(folder, "unet"), resolution=res, batch_size=batch, mesh=mesh,
                            dtype=dtype, with_teacher=True)  # fmt: skip
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    z = noise_for_seeds(list(range(batch)), s.latent_shape)

    def timed(fn):
        first, median, out = time_calls(fn, iters)
        assert out.shape == (batch, res, res, 3) and out.dtype == np.uint8
        return first, median

    c_s, t_s = timed(lambda: s.images(z, prompts))
    row = {"size": size, "batch": batch, "res": res, "device": jax.devices()[0].device_kind, "student_s": t_s,
           "student_compile_s": c_s}  # fmt: skip
    print(f"{size}: student one step: {t_s:.3f} s/batch = {t_s / batch:.4f} s/image ({batch / t_s:.2f} img/s); "
          f"first call {c_s:.1f} s", flush=True)  # fmt: skip
    c_t, t_t = timed(lambda: s.teacher_images(z, prompts, 3.0, steps))
    row.update(teacher_s=t_t, teacher_compile_s=c_t, speedup=t_t / t_s)
    print(f"{size}: teacher {steps}-step CFG: {t_t:.3f} s/batch = {t_t / batch:.4f} s/image "
          f"({batch / t_t:.2f} img/s); first call {c_t:.1f} s; student is {t_t / t_s:.1f}× faster", flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            rows.append(run(size, args.batch, args.iters, args.steps, dtype, root))
    print("\n| size | px | batch | device | dtype | student s/img | teacher s/img | teacher/student |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s_img, t_img = r["student_s"] / r["batch"], r["teacher_s"] / r["batch"]
        print(f"| {r['size']} | {r['res']} | {r['batch']} | {r['device']} | {dtype} | {s_img:.4f} | {t_img:.4f} "
              f"| {r['speedup']:.1f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
