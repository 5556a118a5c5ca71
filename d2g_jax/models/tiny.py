"""A tiny random Stable-Diffusion-architecture pipeline, written in the real diffusers on-disk format.

`configs/tiny.py` uses it so the whole job (pairs → training → export) runs on a 2-core CPU in minutes with no
downloaded weights: `write_tiny_pipeline(folder)` writes `model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/` (a byte-level CLIP BPE vocabulary) and `scheduler/` (SD1.5's DDIM settings), which both our
loaders and `diffusers.StableDiffusionPipeline.from_pretrained` read. No torch: parameters are drawn in NumPy
straight into the `jax.eval_shape` trees (fan-in scaled normals, unit norms, zero biases) and exported with the
same name tables the loaders use.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from d2g_jax.models.clip_text import abstract_params as clip_abstract
from d2g_jax.models.convert import flax_to_torch
from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables, save_unet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import AutoencoderKL, VAEConfig
from d2g_jax.models.vae import abstract_params as vae_abstract
from d2g_jax.models.weights import write_safetensors

# SD1.5's scheduler/scheduler_config.json, as DDIM (the paper's ODE solver).
SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# SD1.5's `model_index.json` without the safety checker / feature extractor (written by every pipeline folder we make).
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

TINY_UNET = UNetConfig(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=(1, 1),
    transformer_layers_per_block=(1, 1),
    reverse_transformer_layers_per_block=(1, 1),
    num_attention_heads=(2, 2),
    cross_attention_dim=(32, 32),
    norm_num_groups=8,
    sample_size=16,
)
TINY_VAE = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215)
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's printable stand-ins for the 256 byte values (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return sorted(chr(c) for c in cs)


def write_tokenizer(folder: str, max_length: int = 77) -> int:
    """A CLIP BPE tokenizer folder over the byte alphabet (no merges). Returns the vocabulary size."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + list(_SPECIAL)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    special = dict(bos_token=_SPECIAL[0], eos_token=_SPECIAL[1], unk_token=_SPECIAL[1], pad_token=_SPECIAL[1])
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=max_length, tokenizer_class="CLIPTokenizer"), f)
    return len(tokens)


def random_params(abstract: Any, seed: int) -> dict[str, Any]:
    """Init-like random values for an abstract params tree: N(0, 1/fan_in) kernels, N(0, 0.02) embeddings,
    unit norm scales, zero biases (host float32 numpy)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in traverse_util.flatten_dict(abstract).items():
        shape, leaf = tuple(spec.shape), path[-1]
        if leaf == "kernel":
            v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif leaf == "embedding":
            v = 0.02 * rng.standard_normal(shape)
        elif leaf == "scale":
            v = np.ones(shape)
        else:
            v = np.zeros(shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def clip_config_json(c: CLIPTextConfig, *, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                     dtype: str | None = None) -> dict[str, Any]:  # fmt: skip
    """transformers' `CLIPTextModel` config.json for `c` (`dtype`: the model dtype transformers builds, if set)."""
    out = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
        "projection_dim": c.projection_dim,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if dtype:
        out["dtype"] = dtype
    return out


def vae_config_json(c: VAEConfig, sample_size: int | None = None) -> dict[str, Any]:
    """diffusers' `AutoencoderKL` config.json for `c` (the fields `VAEConfig.from_diffusers` reads)."""
    n = len(c.block_out_channels)
    out = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(c.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block,
        "mid_block_add_attention": c.mid_block_add_attention,
        "norm_num_groups": c.norm_num_groups,
    }
    if sample_size is not None:
        out["sample_size"] = sample_size
    out["scaling_factor"] = c.scaling_factor
    return out


def _write_model(folder: str, config: dict[str, Any], params: dict[str, Any], weights: str) -> None:
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, weights), flax_to_torch(params), {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def write_tiny_pipeline(
    folder: str, *, seed: int = 0, unet: UNetConfig = TINY_UNET, vae: VAEConfig = TINY_VAE, text_layers: int = 2
) -> str:
    """Writes a random tiny SD1.5-architecture pipeline to `folder` (must not exist or be empty); returns it."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder}: exists and is not empty; refusing to overwrite a pipeline folder.")
    os.makedirs(folder, exist_ok=True)
    vocab = write_tokenizer(os.path.join(folder, "tokenizer"))
    clip = CLIPTextConfig(
        vocab_size=vocab, hidden_size=unet.cross_attention_dim[0], intermediate_size=2 * unet.cross_attention_dim[0],
        num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=77, eos_token_id=2,
    )  # fmt: skip
    clip_params = random_params(clip_abstract(CLIPTextModel(clip)), seed)
    clip_json = clip_config_json(clip, bos_token_id=vocab - 2, eos_token_id=2,  # SD's legacy marker: pool at the
                                 pad_token_id=vocab - 1)  # argmax id (EOS is the largest id)  # fmt: skip
    _write_model(os.path.join(folder, "text_encoder"), clip_json, clip_params, "model.safetensors")

    vae_params = random_params(vae_abstract(AutoencoderKL(vae)), seed + 1)
    _write_model(os.path.join(folder, "vae"), vae_config_json(vae), vae_params, "diffusion_pytorch_model.safetensors")

    unet_params = random_params(nn.unbox(abstract_variables(UNet2DConditionModel(unet)))["params"], seed + 2)
    save_unet(os.path.join(folder, "unet"), unet, {"params": unet_params})

    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(SD15_MODEL_INDEX, f, indent=2)
    jax.clear_caches()
    return folder
