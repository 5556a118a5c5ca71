"""The shipped MNIST-world student (d2g_jax/world/assets/mnist/student, from configs/mnist_long.py): its files match
their recorded sha256, a damaged copy is refused by name, and it draws the prompted digit in the prompted colour
both through our one-step sampler and through diffusers' own StableDiffusionPipeline (one trailing DDIM step at
t = 999, `set_alpha_to_one=True`, no CFG) on the same noise, without any training."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from d2g_jax.eval.attributes import load_classifier
from d2g_jax.world import data as W
from d2g_jax.world.mnist import DEFAULT_DIR
from d2g_jax.world.student import STUDENT_DIR, StudentError, unet_dir

PIPE = os.path.join(DEFAULT_DIR, "pipeline")
# Every digit in red and in magenta, plus four other digit × colour captions: 24 captions.
CAPTIONS = [W.caption(d, c) for d in range(10) for c in (0, 5)] + [W.caption(0, 3), W.caption(7, 2),
                                                                    W.caption(3, 6), W.caption(9, 7)]  # fmt: skip


def _accuracy(images, prompts):
    clf = load_classifier(os.path.join(DEFAULT_DIR, "classifier"))
    pred = clf.predict(images)
    truth = [W.parse_caption(p) for p in prompts]
    return float(np.mean([a == t[0] and b == t[1] for a, b, t in zip(pred["digit"], pred["colour"], truth)]))


def _shipped_accuracy() -> float:
    with open(os.path.join(STUDENT_DIR, "student.json")) as f:
        return float(json.load(f)["report"]["student, 1 step (export)"]["prompt_acc"])


def test_files_match_their_sha256():
    with open(os.path.join(STUDENT_DIR, "export.json")) as f:
        digests = json.load(f)["digests"]
    assert digests["algorithm"] == "sha256" and digests["files"]
    for rel, rec in digests["files"].items():
        with open(os.path.join(STUDENT_DIR, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == rec["sha256"], rel
    assert unet_dir() == os.path.join(STUDENT_DIR, "unet")
    size = sum(os.path.getsize(os.path.join(STUDENT_DIR, r)) for r in digests["files"])
    assert size < 8e6  # a few MB in the repository


def test_a_damaged_copy_is_refused_by_name(tmp_path):
    copy = str(tmp_path / "student")
    shutil.copytree(STUDENT_DIR, copy)
    weights = os.path.join(copy, "unet", "diffusion_pytorch_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(weights, "wb").write(bytes(data))
    with pytest.raises(StudentError, match="diffusion_pytorch_model.safetensors"):
        unet_dir(copy)


def test_our_sampler_and_diffusers_draw_the_prompted_digits():
    from d2g_jax import sharding as shd
    from d2g_jax.generate import OneStepSampler

    mesh = shd.make_mesh(-1, 1)
    n = len(CAPTIONS)
    sampler = OneStepSampler.load(PIPE, unet_dir(), resolution=32, batch_size=shd.round_batch(n, mesh), mesh=mesh,
                                  dtype="float32")  # fmt: skip
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((n, 8, 8, 4)).astype(np.float32)
    ours = sampler.images(noise, CAPTIONS)
    assert ours.shape == (n, 32, 32, 3) and ours.dtype == np.uint8
    acc = _accuracy(ours, CAPTIONS)
    # The shipped run's prompt accuracy on the 500 held-out captions (student.json) less a margin for 24 captions.
    assert acc >= 0.8 and acc >= _shipped_accuracy() - 0.15, (acc, _shipped_accuracy())

    unet = UNet2DConditionModel.from_pretrained(unet_dir()).eval()
    pipe = StableDiffusionPipeline.from_pretrained(PIPE, unet=unet, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True)  # fmt: skip
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2))
    theirs = pipe(CAPTIONS, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="np").images
    theirs = np.round(np.clip(theirs, 0, 1) * 255).astype(np.uint8)
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 2  # the same images (float paths differ)
