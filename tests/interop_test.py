"""The exported generator in the PyTorch world: diffusers' own `StableDiffusionPipeline` /
`StableDiffusionXLPipeline`, loading our export folder as its U-Net, with a one-step DDIM scheduler at the last
timestep (trailing spacing, `set_alpha_to_one=True`, no CFG), gives the same images as our JAX sampler
(`d2g_jax.generate.OneStepSampler`) for the same noise and prompts.

Tolerances: the generator's latents (output_type="latent") within 1e-4 × max|x0| (fp32 differences between
the two stacks are ~1e-6 of it); the decoded images, diffusers' floats (output_type="np", in [0, 1]) vs our uint8,
within 0.6/255 (our rounding to uint8 alone is up to 0.5/255). A wrong α_T/σ_T, timestep, scaling factor or
conditioning moves the latents by far more (see the last test).
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from d2g_jax import sharding as shd
from d2g_jax.generate import OneStepSampler, noise_for_seeds
from d2g_jax.models.tiny import SD15_SCHEDULER, write_tiny_pipeline, write_tokenizer
from d2g_jax.models.unet import load_unet, save_unet
from d2g_jax.train.generator import Generator

PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of fruit"]
TOL = 0.6 / 255
LATENT_TOL = 1e-4  # relative to max |x0|


def _export(teacher: str, out: str, seed: int) -> str:
    """A 'trained' generator: the teacher U-Net with perturbed weights, written as `pipeline.run_export` does."""
    from d2g_jax.sampling import DDIMSchedule

    module, variables = load_unet(os.path.join(teacher, "unet"))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: x + 0.05 * np.std(x) * rng.standard_normal(x.shape).astype(np.float32),
                          variables["params"])  # fmt: skip
    unet_dir = os.path.join(out, "step_00000007", "unet")
    save_unet(unet_dir, module.config, {"params": params})
    gen = Generator(module, DDIMSchedule.from_pipeline(teacher))
    info = {"step": 7, "timestep": gen.t, "alpha_T": gen.alpha_sigma[0], "sigma_T": gen.alpha_sigma[1]}
    with open(os.path.join(out, "step_00000007", "export.json"), "w") as f:
        json.dump(info, f)
    return unet_dir


def _ours(teacher: str, unet_dir: str, resolution: int, seeds):
    mesh = shd.make_mesh(-1, 1)  # 8 virtual CPU devices (tests/conftest.py): the batch is split over them
    sampler = OneStepSampler.load(teacher, unet_dir, resolution=resolution, batch_size=8, mesh=mesh,
                                  dtype="float32")  # fmt: skip
    noise = noise_for_seeds(seeds, sampler.latent_shape)
    return sampler.images(noise, PROMPTS), sampler.latents(noise, PROMPTS), noise


def _one_step_ddim(pipe):
    # diffusers' one-step recipe for the x0 generator: t = 999 (trailing), and the step returns x0 exactly
    # (set_alpha_to_one: ᾱ_prev = 1, so prev_sample = pred_original_sample).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True)  # fmt: skip
    return pipe


def _run(pipe, noise, side, output_type):
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=latents, height=side, width=side,
                   output_type=output_type).images  # fmt: skip
    return out.numpy().transpose(0, 2, 3, 1) if output_type == "latent" else out


def _check_latents(theirs: np.ndarray, ours: np.ndarray) -> None:
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    err = np.abs(theirs - ours).max() / np.abs(theirs).max()
    assert err <= LATENT_TOL, f"max |diffusers − ours| latents = {err:.2e} of max|x0|"


def _check(theirs: np.ndarray, ours: np.ndarray) -> None:
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    diff = np.abs(theirs.astype(np.float64) - ours.astype(np.float64) / 255.0)
    assert diff.max() <= TOL, f"max |diffusers − ours| = {diff.max() * 255:.3f}/255"
    assert theirs.std() > 0.05  # non-trivial images


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    teacher = write_tiny_pipeline(str(tmp / "teacher"), seed=5)
    unet_dir = _export(teacher, str(tmp / "export"), seed=1)
    return (teacher, unet_dir, *_ours(teacher, unet_dir, 32, [11, 12, 13]))


def test_sd_pipeline_one_step_equals_our_sampler(sd):
    teacher, unet_dir, ours, ours_latents, noise = sd

    # The README's three lines.
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    pipe = StableDiffusionPipeline.from_pretrained(teacher, unet=unet, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)  # noqa: E501
    _check_latents(_run(pipe, noise, 32, "latent"), ours_latents)
    assert list(pipe.scheduler.timesteps) == [999]
    _check(_run(pipe, noise, 32, "np"), ours)


def _tiny_sdxl(folder: str) -> str:
    torch.manual_seed(0)
    for sub in ("tokenizer", "tokenizer_2"):
        vocab = write_tokenizer(os.path.join(folder, sub))
    text_cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                    hidden_act="gelu", projection_dim=16)  # fmt: skip
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)).eval()
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text_cfg)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        transformer_layers_per_block=(1, 1),
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        norm_num_groups=8, scaling_factor=0.13025, force_upcast=False,
    ).eval()  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises some output layers; make every path matter
        for m in (unet, vae):
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    sched = DDIMScheduler.from_config({**SD15_SCHEDULER, "steps_offset": 1})
    tok1 = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    tok2 = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def test_sdxl_pipeline_one_step_equals_our_sampler(tmp_path):
    teacher = _tiny_sdxl(str(tmp_path / "teacher"))
    unet_dir = _export(teacher, str(tmp_path / "export"), seed=2)
    ours, ours_latents, noise = _ours(teacher, unet_dir, 16, [3, 4, 5])  # VAE ×2: 8×8 latents
    pipe = _one_step_ddim(StableDiffusionXLPipeline.from_pretrained(
        teacher, unet=UNet2DConditionModel.from_pretrained(unet_dir)))  # fmt: skip
    _check_latents(_run(pipe, noise, 16, "latent"), ours_latents)
    _check(_run(pipe, noise, 16, "np"), ours)


@pytest.mark.parametrize("what", ["alpha", "timestep"])
def test_a_wrong_one_step_recipe_is_detected(sd, what):
    """The latent tolerance is tight enough to see the usual mistakes: diffusers' default `set_alpha_to_one=False`
    (SD1.5's config: the last step re-noises x0 to ᾱ_0), or the default 'leading' spacing (t = 1, not 999)."""
    teacher, unet_dir, _, ours_latents, noise = sd
    pipe = StableDiffusionPipeline.from_pretrained(teacher, unet=UNet2DConditionModel.from_pretrained(unet_dir),
                                                   safety_checker=None)  # fmt: skip
    kw = {"set_alpha_to_one": False} if what == "alpha" else {"set_alpha_to_one": True}
    spacing = "trailing" if what == "alpha" else "leading"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing, **kw)
    with pytest.raises(AssertionError, match="latents"):
        _check_latents(_run(pipe, noise, 32, "latent"), ours_latents)


def test_sample_mode_writes_images_grid_and_teacher_rows(sd, tmp_path):
    """`--config.mode=sample` on the same export, prompts and seeds: the PNGs are the sampler's images, the grid
    interleaves student and teacher rows, and an existing sample folder is not overwritten."""
    import importlib.util

    from PIL import Image

    from d2g_jax import pipeline

    teacher, unet_dir, ours, _, _ = sd
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                           "tiny.py"))  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.teacher.tiny, c.teacher.path, c.mode = False, teacher, "sample"
    c.sample.prompt, c.sample.seed, c.sample.unet = "|".join(PROMPTS), 11, unet_dir
    c.sample.batch_size, c.sample.grid_columns, c.sample.teacher, c.sample.dtype = 8, 2, True, "float32"
    c.sample.out_dir = str(tmp_path / "samples")
    pipeline.run(c, str(tmp_path / "wd"))
    out = c.sample.out_dir
    got = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:05d}.png"))) for i in range(3)])
    assert np.abs(got.astype(int) - ours.astype(int)).max() <= 1
    teacher_imgs = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:05d}_teacher.png"))) for i in range(3)])
    assert np.abs(teacher_imgs.astype(int) - got.astype(int)).mean() > 1  # the 10-step CFG ODE, not the student
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert grid.shape == (4 * 32, 2 * 32, 3)  # [students 0-1; teachers 0-1; student 2 + blank; teacher 2 + blank]
    np.testing.assert_array_equal(grid[32:64, :32], teacher_imgs[0])
    np.testing.assert_array_equal(grid[64:96, :32], got[2])
    with open(os.path.join(out, "samples.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [(r["seed"], r["prompt"]) for r in recs] == list(zip([11, 12, 13], PROMPTS))
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["images_per_s"] > 0
    with pytest.raises(ValueError, match="sample.out_dir=.*exists and is not empty"):
        pipeline.run(c, str(tmp_path / "wd"))  # a rerun into the same folder: refused before anything runs
