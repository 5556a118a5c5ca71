"""The MNIST world's prompt encoder: a small frozen random-init CLIP text model with CLIP's real BPE tokenizer.

* Tokenizer (`tokenizer/`): `vocab.json` + `merges.txt` of OpenAI CLIP's 49,408-token byte-level BPE, built from
  open_clip's bundled `bpe_simple_vocab_16e6.txt.gz` by `d2g_jax.eval.random_extractors._clip_bpe_files`
  (<|startoftext|> = 49406, <|endoftext|> = 49407, also the padding token), plus `tokenizer_config.json`
  (`CLIPTokenizer`, 77 tokens, lower-casing) and `special_tokens_map.json`: exactly the ids of SD's tokenizer.
  No `tokenizer.json` (transformers builds the fast tokenizer from vocab + merges; 2 MB saved).
* Text encoder (`text_encoder/`): a transformers `CLIPTextModel` (`config.json` + `model.safetensors`), never
  trained: the world's U-Net learns to read its features, as SD's U-Net read CLIP's. Hidden size and depth are
  small because the 49,408 × D token embedding dominates the size; the weights are stored as float16 and
  config.json says `"dtype": "float32"`, so transformers (and diffusers' pipeline loader through it) builds a
  float32 model from them, and our loader (`d2g_jax.models.clip_text.load_clip_text`) casts them to its float32
  params. The values drawn are float16-representable (they are rounded before writing), so the float16 file is
  the model itself, not an approximation of it.

Initialisation follows `d2g_jax.models.tiny.random_params` (N(0, 1/fan_in) kernels, N(0, 0.02) embeddings, unit
LayerNorm scales, zero biases), deterministic in `seed`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, abstract_params
from d2g_jax.models.tiny import clip_config_json
from d2g_jax.world import train_util as tu

VOCAB_SIZE = 49408
BOS, EOS = 49406, 49407
MAX_LENGTH = 77
# The world's text encoder: 1.61 M parameters (the 49,408 × 32 token embedding is 98% of them), 3.2 MB in float16.
WORLD_TEXT_HIDDEN, WORLD_TEXT_LAYERS = 32, 2
_SPECIAL = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def text_config(hidden_size: int, layers: int) -> CLIPTextConfig:
    """The world's CLIP text config: `hidden_size` D (a multiple of 16; D/16 heads of 16 channels), a 4·D MLP,
    `layers` layers, CLIP's vocabulary and 77 positions, quick-GELU as CLIP."""
    if hidden_size < 16 or hidden_size % 16:
        raise ValueError(f"hidden_size {hidden_size} must be a positive multiple of 16 (heads of 16 channels).")
    if layers < 1:
        raise ValueError(f"layers {layers} must be at least 1.")
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=hidden_size // 16, max_position_embeddings=MAX_LENGTH, eos_token_id=EOS,
        projection_dim=hidden_size,
    )  # fmt: skip


def text_config_json(c: CLIPTextConfig) -> dict[str, Any]:
    """transformers' `CLIPTextModel` config.json for `c` (float32 model, whatever the stored dtype)."""
    return clip_config_json(c, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, dtype="float32")


def write_tokenizer(folder: str) -> None:
    """CLIP's real tokenizer files into an existing (empty) folder."""
    from d2g_jax.eval.random_extractors import _clip_bpe_files

    vocab, merges = _clip_bpe_files()
    if len(vocab) != VOCAB_SIZE or vocab["<|startoftext|>"] != BOS or vocab["<|endoftext|>"] != EOS:
        raise RuntimeError(f"open_clip's BPE file gave {len(vocab)} tokens (expected {VOCAB_SIZE}, <|startoftext|> = "
                           f"{BOS}); check open_clip's bundled bpe_simple_vocab_16e6.txt.gz.")  # fmt: skip
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(_SPECIAL, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True, **_SPECIAL}
        json.dump(cfg, f, indent=2)


def write_text_encoder(text_dir: str, tokenizer_dir: str, *, seed: int, hidden_size: int, layers: int) -> dict:
    """Writes the random CLIP text encoder to `text_dir` and CLIP's tokenizer to `tokenizer_dir` (each written
    under a temporary name and renamed; non-empty targets are refused before anything is written).

    Returns {"params", "hidden_size", "layers", "heads", "vocab_size", "text_bytes", "tokenizer_bytes"}.
    """
    tu.check_target(text_dir)
    tu.check_target(tokenizer_dir)
    config = text_config(hidden_size, layers)
    params = tu.init_params(abstract_params(CLIPTextModel(config)), seed)
    params = jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), params)  # stored exactly as float16
    tmp_tok = tu.fresh_folder(tokenizer_dir)
    write_tokenizer(tmp_tok)
    tmp_text = tu.fresh_folder(text_dir)
    tu.write_model_folder(tmp_text, text_config_json(config), params, "model.safetensors", dtype=np.float16)
    tu.publish_folder(tmp_tok, tokenizer_dir)
    tu.publish_folder(tmp_text, text_dir)
    return {
        "params": tu.param_count(params),
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": config.num_attention_heads,
        "vocab_size": VOCAB_SIZE,
        "text_bytes": tu.folder_bytes(text_dir),
        "tokenizer_bytes": tu.folder_bytes(tokenizer_dir),
    }
