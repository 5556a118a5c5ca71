"""Fixtures for the pair-data tests: a tiny real SD pipeline folder (diffusers format) and a toy teacher (a
cheap closed-form "U-Net" and hash-based prompt conditioning) for loader tests that only need valid shards."""

import hashlib
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers

from d2g_jax.sampling import DDIMSchedule, Teacher

SD15_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      set_alpha_to_one=False, clip_sample=False)  # fmt: skip
MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tokenizer(folder):
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    eot = "<|endoftext|>"
    special = dict(bos_token="<|startoftext|>", eos_token=eot, unk_token=eot, pad_token=eot)
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(special, model_max_length=77)))
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random SD1.5-like pipeline saved with `save_pretrained` (U-Net, CLIP, tokenizer, DDIM)."""
    root = tmp_path_factory.mktemp("tiny_sd")
    tok = _tokenizer(root / "tok")
    torch.manual_seed(0)
    unet = _randomize(UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16), 0)  # fmt: skip
    te = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, pad_token_id=1, eos_token_id=2)), 1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    folder = root / "pipe"
    pipe.save_pretrained(str(folder))
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(root / "tok", folder / "tokenizer")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_sd_folder):
    return Teacher.from_pipeline(tiny_sd_folder)


def toy_unet(params, x, t, context, **_):
    """A cheap deterministic stand-in for a U-Net: [B, h, w, c] → [B, h, w, c]."""
    return jnp.tanh(params["w"] * x + jnp.mean(context, axis=(1, 2))[:, None, None, None] + t / 1000.0)


class ToyText:
    """Prompt → [B, 4, 8] context from the prompt's sha256 (deterministic; no model)."""

    def encode(self, prompts):
        rows = [np.frombuffer(hashlib.sha256(p.encode()).digest(), np.uint8)[:32] / 255.0 for p in prompts]
        return {"context": jnp.asarray(np.stack(rows).reshape(-1, 4, 8), jnp.float32)}

    def encode_negative(self, batch):
        return {"context": jnp.zeros((batch, 4, 8), jnp.float32)}


def make_toy_teacher(tag: str = "toy-v1") -> Teacher:
    return Teacher(unet_apply=toy_unet, params={"w": jnp.float32(0.5)}, schedule=DDIMSchedule(**SD15_SCHEDULER),
                   text=ToyText(), source="toy", fingerprint={"toy": tag})  # fmt: skip


@pytest.fixture(scope="session")
def toy_teacher_factory():
    """`make_toy_teacher(tag)`: teachers with different tags have different fingerprints."""
    return make_toy_teacher
