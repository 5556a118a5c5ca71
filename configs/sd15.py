"""SD-CFG-3 (paper Table A1): distil Stable Diffusion 1.5 with CFG 3 on LAION-aesthetic-6.25 prompts.

    python -m d2g_jax.main --config=configs/sd15.py --workdir=/runs/sd15_cfg3 \
        --config.teacher.path=/models/stable-diffusion-v1-5 --config.pairs.prompts=/data/laion_a625.parquet
"""

from configs import base


def get_config():
    c = base.get_config()
    c.pairs.guidance_scale = 3.0
    c.pairs.num_pairs = 3_000_000
    c.pairs.resolution = 512
    return c
