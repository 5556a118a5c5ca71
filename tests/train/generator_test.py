"""The one-step generator's x0-parameterisation (paper eq. 8) against diffusers' own DDIM x0 estimate.

Oracle: the tiny random pipeline's U-Net loaded by diffusers (PyTorch) gives ε (or v) at the last timestep T, and
`diffusers.DDIMScheduler.step(...).pred_original_sample` turns it into x0 — the quantity G must equal.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from d2g_jax.models.tiny import write_tiny_pipeline
from d2g_jax.models.unet import load_unet
from d2g_jax.sampling import DDIMSchedule
from d2g_jax.train.generator import Generator


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_tiny_pipeline(str(tmp_path_factory.mktemp("gen") / "pipe"), seed=3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_generator_equals_diffusers_x0_estimate(tiny_pipeline, prediction_type):
    folder = tiny_pipeline
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    sched_cfg.update(prediction_type=prediction_type, clip_sample=False)
    ours = Generator(load_unet(folder)[0], DDIMSchedule.from_config(sched_cfg), vae_scale_factor=4)
    params = load_unet(folder)[1]["params"]
    assert ours.t == 999

    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    x0 = np.asarray(ours(params, jnp.asarray(z), {"context": jnp.asarray(ctx)}))

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    sched = DDIMScheduler.from_config(sched_cfg)
    sched.set_timesteps(50)  # step() needs it for the previous timestep; x0 does not depend on it
    zt = torch.from_numpy(z).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = unet(zt, 999, torch.from_numpy(ctx)).sample
    ref = sched.step(out, 999, zt).pred_original_sample.permute(0, 2, 3, 1).numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(x0, ref, atol=1e-4 * scale, rtol=0)  # fp32, |x0| ~ 1/α_T ≈ 15× |z|
    assert np.abs(x0 - z).max() > 1e-2  # not the identity


def test_zero_snr_epsilon_teacher_is_refused(tiny_pipeline):
    sched = dataclasses.replace(DDIMSchedule(), rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012)  # fmt: skip
    with pytest.raises(ValueError, match="zero-SNR"):
        Generator(load_unet(tiny_pipeline)[0], sched)
    Generator(load_unet(tiny_pipeline)[0], dataclasses.replace(sched, prediction_type="v_prediction"))
