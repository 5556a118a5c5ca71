"""SD-CFG-8 (paper Table A1): Stable Diffusion 1.5 with CFG 8, 12M pairs on LAION-aesthetic-6.0 prompts.

    python -m d2g_jax.main --config=configs/sd15_cfg8.py --workdir=/runs/sd15_cfg8 \
        --config.teacher.path=/models/stable-diffusion-v1-5 --config.pairs.prompts=/data/laion_a6.parquet
"""

from configs import base


def get_config():
    c = base.get_config()
    c.pairs.guidance_scale = 8.0
    c.pairs.num_pairs = 12_000_000
    c.pairs.resolution = 512
    c.train.lr_reading = "stage_switch"  # Table A1 "1e-4→1e-5" read like its batch arrows: 1e-4 in stage 1, 1e-5 in 2
    c.disc.r1_scope = "device"  # "a single sample of each mini-batch": one R1 sample per device (configs/base.py)
    c.train.num_steps = 50_000  # Table A1: first stage 50k
    c.train.batch_size = 2048  # Table A1: 2048 → 1024 (stage 1 → stage 2)
    c.loss.kind = "e_latent_lpips"  # Table A1: E-LatentLPIPS, bgc + cutout
    c.loss.augment = "bgco"
    c.stage2.batch_size = 1024  # Table A1: 2048 → 1024
    return c
