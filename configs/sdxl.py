"""SDXL-CFG-7 (paper Table A1): SDXL-Base-1.0 with CFG 7, 8M pairs of 4×128×128 latents (1024 px).

    python -m d2g_jax.main --config=configs/sdxl.py --workdir=/runs/sdxl_cfg7 \
        --config.teacher.path=/models/stable-diffusion-xl-base-1.0 --config.pairs.prompts=/data/laion_6.parquet
"""

from configs import base


def get_config():
    c = base.get_config()
    c.pairs.guidance_scale = 7.0
    c.pairs.num_pairs = 8_000_000
    c.pairs.resolution = 1024
    c.pairs.batch_size = 32
    c.train.num_steps = 20_000  # Table A1: first stage 20k
    c.train.batch_size = 1024  # Table A1: 1024 → 512 (stage 1 → stage 2)
    c.train.remat = "nothing_saveable"  # 2.6B-parameter U-Net at 128×128 latents
    c.loss.kind = "e_latent_lpips"  # Table A1: E-LatentLPIPS, bgc + cutout
    c.loss.augment = "bgco"
    c.loss.encoder = "sdxl"
    c.pairs.shard_size = 2048
    c.stage2.num_steps = 30_000  # Table A1: second stage 30k
    c.stage2.batch_size = 512  # Table A1: 1024 → 512
    c.stage2.gan_weight = 1.0  # Table A1: λ_GAN 1.0
    c.disc.r1_gamma = 0.0  # Table A1: no R1 for SDXL
    c.disc.b1, c.disc.b2 = 0.0, 0.99  # Table A1: D Adam β = (0, 0.99)
    c.disc.noise_aug = True  # Table A1: noise augment before D
    return c
