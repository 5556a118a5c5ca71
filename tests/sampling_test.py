"""`d2g_jax.sampling` against diffusers: `DDIMScheduler` schedule/timesteps/step parity for several configs, and
end-to-end latents of tiny random `StableDiffusionPipeline` / `StableDiffusionXLPipeline` folders (real on-disk
format: tiny U-Net, VAE, CLIP text encoders, hand-written CLIP BPE tokenizers, DDIM scheduler)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers

from d2g_jax.sampling import (
    DDIMSchedule,
    ScheduleError,
    Teacher,
    alpha_sigma,
    ddim_sample,
    last_timestep,
    sdxl_time_ids,
)

# Schedules: alphas_cumprod within 1 float32 ulp of diffusers (torch's float32 linspace/sqrt round differently
# from numpy's correctly rounded ones; the zero-SNR rescale's ratios amplify that to ~4e-7 absolute).
ACP_ATOL = 5e-7
STEP_RTOL = 1e-5  # one DDIM step: max abs error relative to the output's scale
PIPE_RTOL = 1e-4  # final latent vs the pipeline: max abs error relative to its max magnitude (fp32)

SCHEDULER_CONFIGS = {
    "sd15": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 set_alpha_to_one=False, clip_sample=False),
    "default_leading": dict(),  # linear betas, clip_sample=True, set_alpha_to_one=True, steps_offset=0
    "trailing_v_zero_snr": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                                prediction_type="v_prediction", rescale_betas_zero_snr=True, clip_sample=False),
    "linspace_v": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace",
                       prediction_type="v_prediction", set_alpha_to_one=False, clip_sample_range=0.5),
    "sample_pred": dict(prediction_type="sample", steps_offset=1, set_alpha_to_one=True),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCHEDULER_CONFIGS))
def test_schedule_and_steps_match_ddim_scheduler(name):
    ref = DDIMScheduler(**SCHEDULER_CONFIGS[name])
    ours = DDIMSchedule.from_config(dict(ref.config))
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=ACP_ATOL)
    np.testing.assert_allclose(ours.final_alpha_cumprod, ref.final_alpha_cumprod.numpy(), rtol=0, atol=ACP_ATOL)
    assert ours.init_noise_sigma == ref.init_noise_sigma
    acp_err = np.abs(ours.alphas_cumprod - ref.alphas_cumprod.numpy()).max()
    rng = np.random.default_rng(0)
    worst = 0.0
    for steps in (1, 5, 7, 50, 999):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy(), err_msg=f"{name} {steps} steps")
    for steps in (5, 50):  # every step of a 5- and a 50-step run: (prev_sample, pred_original_sample)
        ref.set_timesteps(steps)
        for t in ref.timesteps.numpy():
            x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
            out = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
            prev_ref, x0_ref = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x), return_dict=False)
            prev, x0 = ours.step(out, int(t), x, steps)
            for a, b in ((prev, prev_ref), (x0, x0_ref)):
                err = np.abs(np.asarray(a) - b.numpy()).max() / np.abs(b.numpy()).max()
                assert err <= STEP_RTOL, f"{name} t={t}: rel err {err:.2e}"
                worst = max(worst, err)
    print(f"{name}: alphas_cumprod max abs err {acp_err:.1e}, worst step rel err {worst:.1e}")  # for -s runs


def test_from_pndm_config_like_diffusers():
    """An SD1.5 folder ships PNDMScheduler's config; `DDIMScheduler.from_config` keeps the shared fields."""
    pndm = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         set_alpha_to_one=False, skip_prk_steps=True)  # fmt: skip
    cfg = dict(pndm.config)
    ref = DDIMScheduler.from_config(cfg)
    ours = DDIMSchedule.from_config(cfg)
    for f in ("beta_schedule", "steps_offset", "set_alpha_to_one", "clip_sample", "timestep_spacing",
              "prediction_type", "num_train_timesteps"):  # fmt: skip
        assert getattr(ours, f) == ref.config[f], f
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=ACP_ATOL)
    ref.set_timesteps(50)
    np.testing.assert_array_equal(ours.timesteps(50), ref.timesteps.numpy())
    # `_use_default_values` fields take DDIM's defaults, as in diffusers.
    cfg2 = dict(cfg, timestep_spacing="trailing", _use_default_values=["timestep_spacing"])
    assert DDIMSchedule.from_config(cfg2).timestep_spacing == DDIMScheduler.from_config(cfg2).config.timestep_spacing


def test_schedule_errors(tmp_path):
    with pytest.raises(ScheduleError, match=r"sched\.json: `thresholding` = true"):
        DDIMSchedule.from_config({"thresholding": True}, source="sched.json")
    with pytest.raises(ScheduleError, match=r"sched\.json: `timestep_spacing` = 'karras'"):
        DDIMSchedule.from_config({"timestep_spacing": "karras"}, source="sched.json")
    with pytest.raises(ScheduleError, match="`prediction_type` = 'flow'"):
        DDIMSchedule(prediction_type="flow")
    with pytest.raises(ScheduleError, match="scheduler_config.json: missing"):
        DDIMSchedule.from_pipeline(str(tmp_path))


def test_alpha_sigma_and_last_timestep():
    s = DDIMSchedule.from_config(SCHEDULER_CONFIGS["sd15"])
    assert last_timestep(s) == 999
    a, sig = alpha_sigma(s, jnp.array([0, 999]))
    np.testing.assert_allclose(np.asarray(a) ** 2 + np.asarray(sig) ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(a) ** 2, s.alphas_cumprod[[0, 999]], rtol=1e-6)
    # jit-traceable timestep
    a_j, _ = jax.jit(lambda t: alpha_sigma(s, t))(jnp.int32(999))
    np.testing.assert_allclose(a_j, a[1], rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Tiny pipelines (real diffusers folders) and the full-sampler parity.

PROMPTS = ["a photo of a cat", "the dog on the moon"]
MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"),
          ("phot", "o</w>"), ("t", "h"), ("th", "e</w>"), ("m", "o"), ("mo", "o"), ("moo", "n</w>")]  # fmt: skip


def _write_tokenizer(folder, pad_token):
    """A real-format CLIP BPE tokenizer (vocab.json + merges.txt) over the 256 byte symbols; BOS/EOS last."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token=pad_token)  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(dict(special, model_max_length=77, tokenizer_class="CLIPTokenizer"))
    )
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _randomize(model, seed):
    """diffusers/transformers init norms to (1, 0) and some convs to 0; perturb every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _clip(cls, seed, **cfg):
    torch.manual_seed(seed)
    base = dict(vocab_size=600, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=24, bos_token_id=0, pad_token_id=1,
                eos_token_id=2)  # fmt: skip
    return _randomize(cls(transformers.CLIPTextConfig(**{**base, **cfg})), seed)


def _unet(seed, **cfg):
    torch.manual_seed(seed)
    base = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                norm_num_groups=8)  # fmt: skip
    return _randomize(UNet2DConditionModel(**{**base, **cfg}), seed)


def _vae(seed):
    torch.manual_seed(seed)
    return _randomize(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                    sample_size=16), seed)  # fmt: skip


def _save(pipe, folder, tokenizers):
    pipe.save_pretrained(str(folder))
    for sub, src in tokenizers.items():  # keep the Hub layout (vocab.json + merges.txt)
        shutil.rmtree(folder / sub)
        shutil.copytree(src, folder / sub)
    return str(folder)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tok = _write_tokenizer(root / "tok", "<|endoftext|>")
    pipe = StableDiffusionPipeline(
        vae=_vae(3), text_encoder=_clip(transformers.CLIPTextModel, 1, hidden_size=32), tokenizer=tok,
        unet=_unet(2, cross_attention_dim=32), scheduler=DDIMScheduler(**SCHEDULER_CONFIGS["sd15"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return pipe, _save(pipe, root / "pipe", {"tokenizer": root / "tok"})


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    tok1 = _write_tokenizer(root / "tok1", "<|endoftext|>")
    tok2 = _write_tokenizer(root / "tok2", "!")
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                          prediction_type="v_prediction")  # fmt: skip
    unet = _unet(5, cross_attention_dim=72, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8, use_linear_projection=True)  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=_vae(6), text_encoder=_clip(transformers.CLIPTextModel, 7, hidden_size=32),
        text_encoder_2=_clip(transformers.CLIPTextModelWithProjection, 8, hidden_size=40, hidden_act="gelu"),
        tokenizer=tok1, tokenizer_2=tok2, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    return pipe, _save(pipe, root / "pipe", {"tokenizer": root / "tok1", "tokenizer_2": root / "tok2"})


def _noise(batch, hw=(8, 8), seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *hw, 4)).astype(np.float32)


def _pipeline_latents(pipe, noise, steps, guidance, vsf):
    h, w = noise.shape[1:3]
    with torch.no_grad():
        out = pipe(PROMPTS, height=h * vsf, width=w * vsf, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(noise).permute(0, 3, 1, 2), output_type="latent").images  # fmt: skip
    return out.permute(0, 2, 3, 1).numpy()


def _check(pipe, folder, steps, guidance, hw=(8, 8)):
    teacher = Teacher.from_pipeline(folder)
    noise = _noise(len(PROMPTS), hw, seed=steps)
    ref = _pipeline_latents(pipe, noise, steps, guidance, teacher.vae_scale_factor)
    ours = np.asarray(teacher.sample(noise, PROMPTS, guidance, steps))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{type(pipe).__name__} {steps} steps CFG {guidance}: max abs err / max |ref| = {err:.2e}")  # for -s runs
    assert err <= PIPE_RTOL, f"{steps} steps, CFG {guidance}: relative max abs error {err:.2e} > {PIPE_RTOL}"
    return teacher, err


@pytest.mark.parametrize("steps,guidance", [(5, 3.0), (5, 1.0), (50, 3.0)])
def test_sd_pipeline_latents_match(sd_pipe, steps, guidance):
    pipe, folder = sd_pipe
    teacher, _ = _check(pipe, folder, steps, guidance)
    assert teacher.vae_scale_factor == 2 and teacher.schedule.steps_offset == 1


@pytest.mark.parametrize("steps", [5])
def test_sdxl_pipeline_latents_match(sdxl_pipe, steps):
    pipe, folder = sdxl_pipe
    teacher, _ = _check(pipe, folder, steps, 3.0, hw=(8, 12))
    assert teacher.schedule.prediction_type == "v_prediction" and teacher.text.pooled_dim == 24


def test_cfg_is_one_batched_unet_call(sd_pipe):
    """With CFG the scan body holds ONE U-Net call on the [uncond; cond] batch of 2B."""
    _, folder = sd_pipe
    teacher = Teacher.from_pipeline(folder)
    calls = []

    def counting_apply(params, x, t, ctx, **kw):
        calls.append((x.shape, ctx.shape))
        return teacher.unet_apply(params, x, t, ctx, **kw)

    cond, uncond = teacher.conditioning(PROMPTS, True)
    ddim_sample(counting_apply, teacher.params, _noise(2), cond, uncond, 3.0, teacher.schedule, 3,
                vae_scale_factor=2)  # fmt: skip
    assert calls == [((4, 8, 8, 4), (4, 77, 32))]  # traced once inside the scan, batch 2B


def test_sdxl_time_ids_default_and_override(sdxl_pipe):
    _, folder = sdxl_pipe
    teacher = Teacher.from_pipeline(folder)
    np.testing.assert_array_equal(sdxl_time_ids(1024, 768, 2), [[1024, 768, 0, 0, 1024, 768]] * 2)
    cond, uncond = teacher.conditioning(PROMPTS, True)
    noise = _noise(2)
    base = ddim_sample(teacher.unet_apply, teacher.params, noise, cond, uncond, 3.0, teacher.schedule, 2,
                       vae_scale_factor=2)  # fmt: skip
    explicit = {**cond, "time_ids": sdxl_time_ids(16, 16, 2)}
    explicit_u = {**uncond, "time_ids": sdxl_time_ids(16, 16, 2)}
    same = ddim_sample(teacher.unet_apply, teacher.params, noise, explicit, explicit_u, 3.0, teacher.schedule, 2)
    np.testing.assert_array_equal(base, same)


def test_sd_pipeline_fixups(sd_pipe, tmp_path):
    """An outdated scheduler config in an SD folder gets the pipeline's in-memory fix-ups."""
    _, folder = sd_pipe
    dst = tmp_path / "pipe"
    shutil.copytree(folder, dst)
    path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(dict(cfg, steps_offset=0, clip_sample=True)))
    s = DDIMSchedule.from_pipeline(str(dst))
    assert s.steps_offset == 1 and s.clip_sample is False
    with torch.no_grad():
        ref = StableDiffusionPipeline.from_pretrained(str(dst)).scheduler.config
    assert (ref.steps_offset, ref.clip_sample) == (1, False)


def test_sampler_errors(sd_pipe):
    _, folder = sd_pipe
    teacher = Teacher.from_pipeline(folder)
    cond, _ = teacher.conditioning(PROMPTS, False)
    args = (teacher.unet_apply, teacher.params, _noise(2), cond)
    with pytest.raises(ValueError, match="needs `uncond`"):
        ddim_sample(*args, None, 3.0, teacher.schedule, 2)
    with pytest.raises(ValueError, match=r"cond\['context'\] has batch 2, the noise has 3"):
        ddim_sample(teacher.unet_apply, teacher.params, _noise(3), cond, None, 1.0, teacher.schedule, 2)
    with pytest.raises(ValueError, match="num_steps must be in"):
        ddim_sample(*args, None, 1.0, teacher.schedule, 0)
