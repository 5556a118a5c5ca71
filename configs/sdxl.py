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
    c.pairs.shard_size = 2048
    return c
