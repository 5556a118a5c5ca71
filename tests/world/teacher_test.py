"""The MNIST world's teacher pipeline, built micro (tiny widths, a few steps, a slice of the splits): every part
is a real diffusers/transformers folder that the PyTorch libraries load with no missing or unexpected tensors and
whose outputs match ours; the tokenizer is CLIP's; the pipeline folder samples in diffusers and in our sampler alike;
bad targets are refused."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from d2g_jax.models.clip_text import load_clip_text
from d2g_jax.models.unet import load_unet
from d2g_jax.models.vae import VAEConfig, load_vae
from d2g_jax.sampling import Teacher
from d2g_jax.world import teacher as T
from d2g_jax.world import text as TX
from d2g_jax.world import vae as V
from d2g_jax.world.data import Split, all_captions, world_splits

# Micro sizes keep the XLA:CPU compiles (which dominate this file's runtime) short: a two-block VAE (16×16 latents)
# without mid-block attention, a one-level U-Net. The world's own architectures (three-block VAE: 8×8 latents;
# WORLD_UNET's block types) are checked without training in `test_world_architectures_fit_the_size_budget`.
MICRO_VAE = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                      mid_block_add_attention=False)  # fmt: skip
MICRO_UNET = dataclasses.replace(T.WORLD_UNET, block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",),
                                 up_block_types=("CrossAttnUpBlock2D",), layers_per_block=(1,),
                                 transformer_layers_per_block=(1,), reverse_transformer_layers_per_block=(1,),
                                 num_attention_heads=(1,), cross_attention_dim=(16,), norm_num_groups=4)  # fmt: skip
CAPTION = "a magenta seven on a black background"


def _subset(split: Split, rows: np.ndarray) -> Split:
    return Split(split.name, split.images[rows], split.gray[rows], split.digits[rows], split.colours[rows],
                 split.mnist_index[rows])  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro world: VAE (2 steps), text encoder (D 16, 1 layer), U-Net (2 steps), pipeline folder."""
    root = tmp_path_factory.mktemp("world")
    full = world_splits(0)
    splits = {"train": _subset(full["train"], np.arange(0, 4500, 90)),  # 50 digits, 5 of each class
              "heldout": _subset(full["heldout"], np.arange(0, 500, 50))}  # fmt: skip
    d = {k: str(root / k) for k in ("vae", "text_encoder", "tokenizer", "unet", "pipe")}
    vae = V.train_vae(d["vae"], splits, seed=0, steps=2, batch_size=8, config=MICRO_VAE, log=lambda s: None)
    text = TX.write_text_encoder(d["text_encoder"], d["tokenizer"], seed=0, hidden_size=16, layers=1)
    unet = T.train_unet(d["unet"], splits, d["vae"], d["text_encoder"], d["tokenizer"], seed=0, steps=2, batch_size=8,
                        config=MICRO_UNET, log=lambda s: None)  # fmt: skip
    T.write_pipeline(d["pipe"], d["vae"], d["text_encoder"], d["tokenizer"], d["unet"])
    return dict(d, splits=splits, metrics={"vae": vae, "text": text, "unet": unet})


def _autoencode(module, variables, x):
    mean = module.apply(variables, x, method="encode").mean
    return mean, module.apply(variables, mean, method="decode")


def _assert_close(ours, ref, tol):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} × scale {scale:.3g}"


def _clean(info) -> bool:
    return not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_vae_loads_in_diffusers_matches_ours_and_scaling_factor_is_one_over_std(world):
    ref, info = AutoencoderKL.from_pretrained(world["vae"], output_loading_info=True)
    assert _clean(info), info
    module, variables = load_vae(world["vae"])
    images = world["splits"]["train"].images
    x = images.astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        mean = dist.mean.permute(0, 2, 3, 1).numpy()
        recon = ref.decode(dist.mean).sample.permute(0, 2, 3, 1).numpy()
    ours_mean, ours_recon = jax.jit(lambda v, x: _autoencode(module, v, x))(variables, jnp.asarray(x))
    # fp32 on both sides; max abs error relative to the output's magnitude (GroupNorm over near-constant black
    # regions amplifies rounding in the barely trained micro VAE: measured ≈ 2e-4 on the decode).
    _assert_close(ours_mean, mean, 1e-4)
    _assert_close(ours_recon, recon, 1e-3)
    with open(os.path.join(world["vae"], "config.json")) as f:
        cfg = json.load(f)
    # SD's rule: scaling_factor = 1 / std of the train split's latents (diffusers' posterior means here).
    assert cfg["scaling_factor"] == pytest.approx(1.0 / float(mean.std()), rel=1e-4)
    assert cfg["block_out_channels"] == [8, 8] and module.config.downscale == 2
    m = world["metrics"]["vae"]
    assert np.isfinite(m["heldout_psnr"]) and m["scaling_factor"] == pytest.approx(cfg["scaling_factor"])


def test_text_encoder_loads_in_transformers_matches_ours_with_clip_tokenizer(world):
    import open_clip

    ref, info = transformers.CLIPTextModel.from_pretrained(world["text_encoder"], output_loading_info=True)
    assert _clean(info), info
    assert ref.dtype == torch.float32 and ref.config.vocab_size == 49408
    tok = transformers.CLIPTokenizer.from_pretrained(world["tokenizer"])
    captions = all_captions()
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    # open_clip pads with 0 after <|endoftext|>; SD's tokenizer pads with <|endoftext|>: compare up to the end token.
    expected = open_clip.tokenize(captions).numpy()
    for row, exp in zip(ids.numpy(), expected):
        n = int(np.argmax(exp == TX.EOS)) + 1
        np.testing.assert_array_equal(row[:n], exp[:n])
        assert (row[n:] == TX.EOS).all()
    assert ids[0, 0] == TX.BOS
    module, params = load_clip_text(world["text_encoder"])
    with torch.no_grad():
        hidden = ref(ids[:4]).last_hidden_state.numpy()
    ours = jax.jit(module.apply)(params, jnp.asarray(ids[:4].numpy())).last_hidden_state
    _assert_close(ours, hidden, 1e-5)
    assert world["metrics"]["text"]["hidden_size"] == 16


def test_unet_loads_in_diffusers_and_matches_ours(world):
    ref, info = UNet2DConditionModel.from_pretrained(world["unet"], output_loading_info=True)
    assert _clean(info), info
    module, variables = load_unet(world["unet"])
    assert module.config.cross_attention_dim == (16,) and module.config.sample_size == 16  # 32 px / VAE downscale 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 16)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        expect = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    ours = jax.jit(module.apply)(variables, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    _assert_close(ours, expect.permute(0, 2, 3, 1).numpy(), 1e-5)
    assert np.abs(np.asarray(ours)).max() > 0  # conv_out was zero-initialised: training moved it


def test_pipeline_samples_in_diffusers_as_in_our_teacher(world):
    pipe = StableDiffusionPipeline.from_pretrained(world["pipe"])
    noise = np.random.default_rng(1).standard_normal((1, 16, 16, 4)).astype(np.float32)
    out = pipe(CAPTION, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
               latents=torch.from_numpy(noise).permute(0, 3, 1, 2))  # fmt: skip
    expect = out.images.permute(0, 2, 3, 1).numpy()
    teacher = Teacher.from_pipeline(world["pipe"])
    ours = np.asarray(teacher.sample(jnp.asarray(noise), [CAPTION], 3.0, 2))
    _assert_close(ours, expect, 1e-4)
    with torch.no_grad():  # the pipeline's own decode step, as output_type="pil" runs it
        images = pipe.vae.decode(out.images / pipe.vae.config.scaling_factor).sample
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_refuses_non_empty_targets_and_mismatched_parts(world, tmp_path):
    with pytest.raises(FileExistsError, match=str(world["pipe"])):
        T.write_pipeline(world["pipe"], world["vae"], world["text_encoder"], world["tokenizer"], world["unet"])
    with pytest.raises(FileExistsError, match=str(world["vae"])):
        V.train_vae(world["vae"], world["splits"], seed=0, steps=1, batch_size=4)
    with pytest.raises(FileExistsError, match=str(world["unet"])):
        T.train_unet(world["unet"], world["splits"], world["vae"], world["text_encoder"], world["tokenizer"], seed=0,
                     steps=1, batch_size=4)  # fmt: skip
    with pytest.raises(FileExistsError, match=str(world["tokenizer"])):
        TX.write_text_encoder(str(tmp_path / "te"), world["tokenizer"], seed=0, hidden_size=16, layers=1)
    assert not os.path.exists(tmp_path / "te")  # nothing written when one target is refused
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        T.write_pipeline(str(tmp_path / "p"), world["vae"], world["text_encoder"], world["vae"], world["unet"])
    assert not os.path.exists(tmp_path / "p")


def test_world_architectures_fit_the_size_budget(tmp_path):
    """The full-size world parts (no training): float32 VAE ≤ 3 MB, float32 U-Net ≤ 5 MB and a config diffusers
    builds with every tensor ours writes, float16 text encoder + tokenizer files ≤ 6 MB (measured in the test
    below at D 16; here from the parameter count at the world's D)."""
    import flax.linen as nn

    from d2g_jax.models.clip_text import CLIPTextModel
    from d2g_jax.models.clip_text import abstract_params as clip_abstract
    from d2g_jax.models.tiny import random_params
    from d2g_jax.models.unet import UNet2DConditionModel as FlaxUNet
    from d2g_jax.models.unet import abstract_variables, save_unet
    from d2g_jax.models.vae import AutoencoderKL as FlaxVAE
    from d2g_jax.models.vae import abstract_params as vae_abstract
    from d2g_jax.world.train_util import param_count

    assert param_count(vae_abstract(FlaxVAE(V.WORLD_VAE))) * 4 <= 3e6
    assert FlaxVAE(V.WORLD_VAE).config.downscale == 4
    unet_cfg = T.world_unet_config(TX.WORLD_TEXT_HIDDEN)
    params = random_params(nn.unbox(abstract_variables(FlaxUNet(unet_cfg)))["params"], 0)
    save_unet(str(tmp_path / "unet"), unet_cfg, {"params": params})
    assert os.path.getsize(tmp_path / "unet" / "diffusion_pytorch_model.safetensors") <= 5e6
    _, info = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"), output_loading_info=True)
    assert _clean(info), info
    text_params = param_count(clip_abstract(CLIPTextModel(TX.text_config(TX.WORLD_TEXT_HIDDEN, TX.WORLD_TEXT_LAYERS))))
    assert text_params * 2 + 1.5e6 <= 6e6


def test_text_encoder_is_deterministic_in_its_seed(tmp_path):
    a = TX.write_text_encoder(str(tmp_path / "a"), str(tmp_path / "ta"), seed=3, hidden_size=16, layers=1)
    TX.write_text_encoder(str(tmp_path / "b"), str(tmp_path / "tb"), seed=3, hidden_size=16, layers=1)
    TX.write_text_encoder(str(tmp_path / "c"), str(tmp_path / "tc"), seed=4, hidden_size=16, layers=1)
    read = lambda d: open(os.path.join(tmp_path, d, "model.safetensors"), "rb").read()
    assert read("a") == read("b") and read("a") != read("c")
    assert a["text_bytes"] + a["tokenizer_bytes"] < 6e6
