"""Pair-generation throughput: our jitted DDIM `lax.scan` teacher vs the diffusers PyTorch pipeline loop, side by
side in one run on the same random pipeline folder, same noise and prompts (paper §4: pairs are 50-step DDIM
ODE solutions with CFG; here a smaller-but-not-trivial teacher so it runs on a CPU).

    python bench/pairs.py [--steps 20] [--batch 4] [--latent 32] [--iters 3] [--guidance 3.0] [--threads 2]

Teacher: SD-like U-Net, block_out_channels (64, 128, 128), 2 layers per block, cross-attention dim 64, a 2-layer
CLIP text encoder (hidden 64); DDIM (SD1.5 schedule); latents `--latent`² × 4. Both sides encode the prompts
and run `--steps` steps with CFG (one batched U-Net call on [uncond; cond] per step). Warm-up (JAX: compile;
torch: first call) is excluded and reported; the median of `--iters` timed runs gives pairs/s. The final
latents of the two are also compared (max abs error relative to their scale). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.timing import time_calls  # noqa: E402

MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("ph", "o")]


def make_pipeline(folder: str, latent: int):
    """Writes a random SD-like pipeline (real diffusers format) to `folder`; returns the PyTorch pipeline."""
    import torch
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import pre_tokenizers

    tok_dir = os.path.join(folder + "_tok")
    os.makedirs(tok_dir, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    eot = "<|endoftext|>"
    special = dict(bos_token="<|startoftext|>", eos_token=eot, unk_token=eot, pad_token=eot)
    with open(os.path.join(tok_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=77), f)
    tok = transformers.CLIPTokenizer.from_pretrained(tok_dir)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent, block_out_channels=(64, 128, 128), layers_per_block=2, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )  # fmt: skip
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=len(tokens) - 2, eos_token_id=2, pad_token_id=len(tokens) - 1,
    ))  # fmt: skip
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    shutil.copytree(tok_dir, os.path.join(folder, "tokenizer"))
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from d2g_jax.sampling import Teacher

    torch.set_num_threads(args.threads)
    prompts = [f"a photo of a cat number {i}" for i in range(args.batch)]
    noise = np.random.default_rng(0).standard_normal((args.batch, args.latent, args.latent, 4)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "pipe")
        pipe = make_pipeline(folder, args.latent)
        pipe.set_progress_bar_config(disable=True)
        latents_t = torch.from_numpy(noise).permute(0, 3, 1, 2)
        px = args.latent * 8

        def torch_run():
            with torch.no_grad():
                out = pipe(prompts, height=px, width=px, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           latents=latents_t.clone(), output_type="latent").images  # fmt: skip
            return out.permute(0, 2, 3, 1).numpy()

        teacher = Teacher.from_pipeline(folder)

        def jax_run():
            return np.asarray(jax.block_until_ready(teacher.sample(noise, prompts, args.guidance, args.steps)))

        t_warm, t_med, t_out = time_calls(torch_run, args.iters)
        j_warm, j_med, j_out = time_calls(jax_run, args.iters)

    err = np.abs(j_out - t_out).max() / np.abs(t_out).max()
    n_unet = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"\nPair generation, CPU ({args.threads} threads, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__}): U-Net {n_unet:.1f}M params, latents {args.batch}×{args.latent}×{args.latent}"
          f"×4, {args.steps} DDIM steps, CFG {args.guidance} (2×{args.batch} per U-Net call), median of "
          f"{args.iters}\n")  # fmt: skip
    print("| implementation | warm-up / compile (s) | s per batch | pairs/s |")
    print("|---|---:|---:|---:|")
    print(f"| diffusers StableDiffusionPipeline (PyTorch loop) | {t_warm:.2f} | {t_med:.3f} | "
          f"{args.batch / t_med:.2f} |")  # fmt: skip
    print(f"| d2g_jax ddim_sample (jit + lax.scan) | {j_warm:.2f} | {j_med:.3f} | {args.batch / j_med:.2f} |")
    print(f"\nspeed-up (ours / diffusers, pairs/s): **{t_med / j_med:.2f}×**; final latents agree to "
          f"{err:.1e} (max abs error / max |latent|)")  # fmt: skip


if __name__ == "__main__":
    main()
