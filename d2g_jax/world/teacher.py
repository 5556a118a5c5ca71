"""The MNIST world's teacher: a small SD-architecture U-Net trained in JAX on the world VAE's latents, and the
writer of the diffusers pipeline folder that holds it with the world's VAE, text encoder and tokenizer.

`train_unet(out_dir, splits, vae_dir, text_dir, tokenizer_dir, ...)` trains our Flax `UNet2DConditionModel`
(`WORLD_UNET`) as SD1.5 was trained, scaled down:
* data: the *scaled* diffusion latents (`AutoencoderKL.encode_latents`, posterior mean × scaling_factor) of the train
  split's digits. Re-colouring augmentation (`data.recoloured_batch`: every digit in a random palette colour, with the
  matching caption) is applied through a cache: each digit is encoded once in each of the 8 colours (8 × 4,500
  latents), and a batch picks the latent of the colour `recoloured_batch` drew;
* conditioning: the frozen text encoder's last hidden state of the caption (`d2g_jax.models.text.TextEncoder`, as the
  pipeline encodes prompts), replaced with probability `cond_dropout` (10%) by that of the empty prompt "", which is
  how SD and diffusers form the unconditional branch of classifier-free guidance;
* objective: ε-prediction MSE at t ~ U{0, …, 999} on SD1.5's scaled-linear schedule (`SD15_SCHEDULER`);
* optimiser: AdamW (warm-up + cosine), gradient clipping; an EMA of the weights (β `ema_beta`, warmed up) is
  exported, as a diffusers U-Net folder (`save_unet`, float32).

`write_pipeline(folder, vae_dir, text_dir, tokenizer_dir, unet_dir)` assembles `model_index.json`, `vae/`, `unet/`,
`text_encoder/`, `tokenizer/` and `scheduler/` (SD1.5's DDIM settings) under a temporary name and renames it into
place: `diffusers.StableDiffusionPipeline.from_pretrained(folder)`, `d2g_jax.sampling.Teacher.from_pipeline` and
`d2g_jax.generate.OneStepSampler.load` read it. `teacher_samples` draws the teacher's DDIM samples (CFG) with the
project's own sampler and VAE decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.models.clip_text import load_clip_text
from d2g_jax.models.text import TextEncoder
from d2g_jax.models.tiny import SD15_MODEL_INDEX, SD15_SCHEDULER
from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables, save_unet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import VAEConfig, load_vae
from d2g_jax.models.weights import WeightsError, read_config
from d2g_jax.sampling import DDIMSchedule
from d2g_jax.world import train_util as tu
from d2g_jax.world.data import COLOURS, SIDE, Split, all_captions, colourise, recoloured_batch

# Two resolutions (8×8 and 4×4 latents): a plain resnet block at 8×8, cross-attention at 4×4 and in the mid block,
# where the prompt's digit and colour are read. See `train_unet`'s report for parameters and step time.
WORLD_UNET = UNetConfig(
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=(1, 1),
    transformer_layers_per_block=(1, 1),
    reverse_transformer_layers_per_block=(1, 1),
    num_attention_heads=(2, 2),
    cross_attention_dim=(32, 32),
    norm_num_groups=8,
    sample_size=8,
)
COND_DROPOUT = 0.1
EMPTY_PROMPT = ""
# Files each pipeline part must hold (the writer refuses a part without them, naming the folder).
_PART_FILES = {
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("vocab.json", "merges.txt", "tokenizer_config.json"),
}
_SKIP_FILES = ("DONE",)  # dev markers that are not part of a model folder


def world_unet_config(cross_attention_dim: int, base: UNetConfig = WORLD_UNET) -> UNetConfig:
    """`base` with every block's cross-attention width set to the text encoder's hidden size."""
    return dataclasses.replace(base, cross_attention_dim=(cross_attention_dim,) * len(base.block_out_channels))


def load_text(text_dir: str, tokenizer_dir: str) -> TextEncoder:
    """The world's prompt encoder from its two folders, exactly as `TextEncoder.from_pipeline` builds it."""
    from transformers import CLIPTokenizer

    _check_part("text_encoder", text_dir)
    _check_part("tokenizer", tokenizer_dir)
    module, params = load_clip_text(text_dir)
    return TextEncoder([CLIPTokenizer.from_pretrained(tokenizer_dir)], [module], [params], sdxl=False)


def encode_colour_cache(vae_dir: str, split: Split, batch: int = 250) -> np.ndarray:
    """Scaled latents of every digit of `split` in every palette colour: float32 [len(COLOURS), N, h, w, C]."""
    module, variables = load_vae(vae_dir, parts=("encoder",))
    fn = jax.jit(lambda v, x: module.apply(v, x, method="encode_latents"))
    out = []
    for c in range(len(COLOURS)):
        out.append(tu.padded_batches(lambda g, c=c: fn(variables, tu.to_unit(colourise(g, c))), split.gray, batch))
    return np.stack(out)


def caption_table(text: TextEncoder) -> tuple[np.ndarray, dict[str, int]]:
    """Contexts of the 80 world captions and of "" (last row): float32 [81, 77, D], and caption → row."""
    captions = all_captions() + [EMPTY_PROMPT]  # "" encodes as `encode_negative` does for SD (no clip_skip)
    return np.asarray(text.encode(captions)["context"]), {c: i for i, c in enumerate(captions)}


def diffusion_loss(module: UNet2DConditionModel, params: Any, x0: jax.Array, context: jax.Array, t: jax.Array,
                   eps: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:  # fmt: skip
    """ε-prediction MSE at timesteps t [B] with noise eps [B, h, w, C]: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε.
    x0: [B, h, w, C] scaled latents, context: [B, S, D]."""
    ab = alphas_cumprod[t][:, None, None, None]
    xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    pred = module.apply({"params": params}, xt, t, context)
    return jnp.mean(jnp.square(pred - eps))


def draw_noise(rng: np.random.Generator, shape: tuple[int, ...], timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """Host draws of the diffusion loss: (t int32 [B] uniform over the timesteps, ε float32 standard normal)."""
    return rng.integers(0, timesteps, shape[0]).astype(np.int32), rng.standard_normal(shape, np.float32)


def train_unet(
    out_dir: str,
    splits: Mapping[str, Split],
    vae_dir: str,
    text_dir: str,
    tokenizer_dir: str,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    log: tu.Log = print,
    config: UNetConfig = WORLD_UNET,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    ema_beta: float = 0.999,
    cond_dropout: float = COND_DROPOUT,
) -> dict[str, Any]:
    """Trains the world's teacher U-Net (see the module docstring) and writes its EMA weights to `out_dir` as a
    diffusers U-Net folder. `config.cross_attention_dim` is set to the text encoder's hidden size.

    Returns {"params", "steps", "batch_size", "seconds", "train_loss" (mean of the last 10% of steps),
    "heldout_loss" (EMA weights, fixed draws), "heldout_loss_raw" (raw weights), "step_seconds" (one train step
    at this batch size, after compile), "bytes"}. A non-empty `out_dir` is refused before any training.
    """
    tu.check_target(out_dir)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_unet: steps ({steps}) and batch_size ({batch_size}) must be positive.")
    if not 0.0 <= cond_dropout < 1.0:
        raise ValueError(f"train_unet: cond_dropout {cond_dropout} must be in [0, 1).")
    train, held = splits["train"], splits["heldout"]
    t0 = time.perf_counter()
    text = load_text(text_dir, tokenizer_dir)
    vae_config = VAEConfig.from_diffusers(read_config(vae_dir), source=os.path.join(vae_dir, "config.json"))
    config = world_unet_config(text.context_dim, config)
    if config.in_channels != vae_config.latent_channels or config.out_channels != vae_config.latent_channels:
        raise ValueError(f"{vae_dir}: the VAE has {vae_config.latent_channels} latent channels; the U-Net config has "
                         f"in/out {config.in_channels}/{config.out_channels}.")  # fmt: skip
    ctx_table, row_of = caption_table(text)
    chunk = min(250, len(train))  # one encoder batch shape for both splits: one compile
    cache = encode_colour_cache(vae_dir, train, chunk)  # [8, N, h, w, C]
    held_latents = encode_colour_cache(vae_dir, held, chunk)[held.colours, np.arange(len(held))]
    held_ctx_rows = np.asarray([row_of[c] for c in held.captions], np.int32)
    log(f"unet: cached {cache.shape[0]}×{cache.shape[1]} latents {cache.shape[2:]} (std {cache.std():.3f}) and "
        f"{len(ctx_table)} contexts in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    config = dataclasses.replace(config, sample_size=cache.shape[2])  # diffusers' default height = this × downscale

    module = UNet2DConditionModel(config)
    abstract = nn.unbox(abstract_variables(module))["params"]
    params = tu.init_params(abstract, seed, zero=("conv_out/",))
    n_params = tu.param_count(params)
    schedule = DDIMSchedule.from_config(SD15_SCHEDULER)
    alphas = jnp.asarray(schedule.alphas_cumprod)
    opt, lr_schedule = tu.adamw(lr, steps, warmup=min(500, steps // 10), weight_decay=weight_decay)
    flat, unravel = tu.ravel(params)  # parameters, Adam moments and EMA as vectors (few XLA ops to compile)
    opt_state = opt.init(flat)
    ema = flat
    ctx_dev = jnp.asarray(ctx_table)
    log(f"unet: {n_params / 1e6:.3f} M params {config.block_out_channels}, {steps} steps × {batch_size}")

    # The loss and its gradient are one jitted function, reused (gradient unused) for the held-out loss at the same
    # batch shape, so XLA compiles the U-Net once; the AdamW + EMA update of the flat vectors is a second one.
    loss_fn = lambda f, x0, rows, t, eps: diffusion_loss(module, unravel(f), x0, ctx_dev[rows], t, eps, alphas)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    @jax.jit
    def update_fn(flat, opt_state, ema, grads, step):
        updates, opt_state = opt.update(grads, opt_state, flat)
        flat = flat + updates
        return flat, opt_state, tu.ema_update(ema, flat, tu.ema_decay(step, ema_beta))

    rng = np.random.default_rng([seed, 2])
    rows = tu.epoch_rows(len(train), batch_size, rng)
    progress = tu.Progress("unet", steps, log, every=max(1, steps // 40))
    losses = np.zeros(steps, np.float32)
    step_seconds = []
    for step in range(steps):
        r = next(rows)
        _, captions, colours = recoloured_batch(train, r, rng)
        drop = rng.random(batch_size) < cond_dropout
        ctx_rows = np.asarray([row_of[EMPTY_PROMPT if d else c] for c, d in zip(captions, drop)], np.int32)
        x0 = cache[colours, r]
        t, eps = draw_noise(rng, x0.shape, len(alphas))  # host draws: no RNG inside the compiled step
        t_step = time.perf_counter()
        loss, grads = grad_fn(flat, x0, ctx_rows, t, eps)
        flat, opt_state, ema = update_fn(flat, opt_state, ema, grads, step)
        losses[step] = float(loss)
        if step in (2, 3, 4):
            step_seconds.append(time.perf_counter() - t_step)
        progress(step, loss=float(losses[max(0, step - 49) : step + 1].mean()), lr=float(lr_schedule(step)))
    seconds = progress.seconds

    # Held-out ε-MSE: the held-out digits (in their split colours and captions) in whole batches (the first
    # ⌊N / B⌋·B rows; at least one batch, repeating rows if N < B), fixed (t, ε) draws, EMA and raw weights.
    eval_rows = np.arange(max(batch_size, len(held) - len(held) % batch_size)) % len(held)
    draws = draw_noise(np.random.default_rng([seed, 3]), (len(eval_rows), *cache.shape[2:]), len(alphas))

    def heldout(f) -> float:
        out = []
        for i in range(0, len(eval_rows), batch_size):
            b = eval_rows[i : i + batch_size]
            out.append(float(grad_fn(f, held_latents[b], held_ctx_rows[b], *(d[i : i + batch_size] for d in draws))[0]))
        return float(np.mean(out))

    held_ema, held_raw = heldout(ema), heldout(flat)
    log(f"unet: held-out ε-MSE {held_ema:.4f} (EMA) / {held_raw:.4f} (raw); {seconds:.0f}s")
    ema = jax.device_get(unravel(ema))

    tmp = tu.fresh_folder(out_dir)
    os.rmdir(tmp)  # save_unet creates it
    save_unet(tmp, config, {"params": ema})
    result = {
        "params": n_params,
        "steps": steps,
        "batch_size": batch_size,
        "seconds": seconds,
        "train_loss": float(losses[-max(1, steps // 10) :].mean()),
        "heldout_loss": held_ema,
        "heldout_loss_raw": held_raw,
        "step_seconds": float(np.median(step_seconds)) if step_seconds else float("nan"),
        "bytes": tu.folder_bytes(tmp),
    }
    with open(os.path.join(tmp, "train_info.json"), "w") as f:
        json.dump(result, f, indent=2)
    tu.publish_folder(tmp, out_dir)
    return result


# ----------------------------------------------------------------------------------------------------------
# The pipeline folder.


def _check_part(name: str, folder: str) -> None:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: the {name} folder does not exist.")
    missing = [f for f in _PART_FILES[name] if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder}: not a {name} folder, missing {missing}.")


def write_pipeline(folder: str, vae_dir: str, text_dir: str, tokenizer_dir: str, unet_dir: str) -> str:
    """Assembles a diffusers `StableDiffusionPipeline` folder from the four parts (copied) plus `scheduler/`
    (SD1.5's DDIM config) and `model_index.json`; written under a temporary name and renamed. Refuses a non-empty
    `folder`, missing part files, and parts that do not fit together (each error names the folder or field)."""
    tu.check_target(folder)
    parts = {"vae": vae_dir, "text_encoder": text_dir, "tokenizer": tokenizer_dir, "unet": unet_dir}
    for name, src in parts.items():
        _check_part(name, src)
    vae = VAEConfig.from_diffusers(read_config(vae_dir), source=os.path.join(vae_dir, "config.json"))
    unet = UNetConfig.from_diffusers(read_config(unet_dir), source=os.path.join(unet_dir, "config.json"))
    hidden = read_config(text_dir).get("hidden_size")
    if any(d != hidden for d in unet.cross_attention_dim):
        raise WeightsError(f"{unet_dir}/config.json: cross_attention_dim {list(unet.cross_attention_dim)} does not "
                           f"match the text encoder's hidden_size {hidden} ({text_dir}/config.json).")  # fmt: skip
    if unet.in_channels != vae.latent_channels:
        raise WeightsError(f"{unet_dir}/config.json: in_channels {unet.in_channels} does not match the VAE's "
                           f"latent_channels {vae.latent_channels} ({vae_dir}/config.json).")  # fmt: skip
    if unet.sample_size is not None and unet.sample_size * vae.downscale != SIDE:
        raise WeightsError(f"{unet_dir}/config.json: sample_size {unet.sample_size} × the VAE's downscale "
                           f"{vae.downscale} is not the world's {SIDE}-pixel side.")  # fmt: skip
    tmp = tu.fresh_folder(folder)
    try:
        for name, src in parts.items():
            shutil.copytree(src, os.path.join(tmp, name), ignore=shutil.ignore_patterns(*_SKIP_FILES))
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(SD15_SCHEDULER, f, indent=2)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(SD15_MODEL_INDEX, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tu.publish_folder(tmp, folder)


@functools.partial(jax.jit, static_argnums=0)
def _noise(shape: tuple[int, int, int], seeds: jax.Array) -> jax.Array:
    """Row b = `jax.random.normal(PRNGKey(seeds[b]), shape)`: the noise of `d2g_jax.generate.noise_for_seeds` (the
    project's sample mode), without importing its training stack."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)


def teacher_samples(folder: str, prompts: Sequence[str], *, seed: int, guidance_scale: float = 3.0,
                    num_steps: int = 50, batch: int = 80) -> np.ndarray:  # fmt: skip
    """The teacher's DDIM images (project sampler: `Teacher.from_pipeline` + `ddim_sample` with CFG, then the VAE
    decoder) for `prompts`, image i from `jax.random.normal(key(seed + i))` noise: uint8 [N, 32, 32, 3]."""
    from d2g_jax.sampling import Teacher

    teacher = Teacher.from_pipeline(folder)
    vae, vae_vars = load_vae(folder, parts=("decoder",))
    decode = jax.jit(lambda v, z: vae.apply(v, z, method="decode_latents"))
    side = SIDE // vae.config.downscale
    shape = (side, side, teacher.latent_channels)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        noise = _noise(shape, jnp.arange(seed + i, seed + i + len(chunk), dtype=jnp.uint32))
        x0 = teacher.sample(jnp.asarray(noise), chunk, guidance_scale, num_steps)
        out.append(tu.to_uint8(decode(vae_vars, x0)))
    return np.concatenate(out)
