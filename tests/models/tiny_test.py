"""The runtime-written tiny pipeline is a real diffusers/transformers pipeline: the PyTorch libraries load every
component without missing/unexpected keys, and our loaders read the same folder."""

import os

import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel

from d2g_jax.models.text import TextEncoder
from d2g_jax.models.tiny import write_tiny_pipeline
from d2g_jax.models.unet import load_unet
from d2g_jax.models.vae import load_vae


def test_tiny_pipeline_loads_in_diffusers_and_ours(tmp_path):
    folder = write_tiny_pipeline(str(tmp_path / "pipe"), seed=3)
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(os.path.join(folder, sub), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (sub, info)
    te, info = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = te(ids).last_hidden_state.numpy()
    ours = np.asarray(TextEncoder.from_pipeline(folder).encode(["a photo of a cat"])["context"])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    load_unet(folder)
    load_vae(folder)


def test_refuses_to_overwrite(tmp_path):
    folder = write_tiny_pipeline(str(tmp_path / "pipe"))
    try:
        write_tiny_pipeline(folder)
    except FileExistsError as e:
        assert "refusing to overwrite" in str(e)
    else:
        raise AssertionError("overwrote an existing pipeline folder")
