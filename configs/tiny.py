"""A tiny random SD-architecture teacher, created in the workdir, so the whole job runs on a 2-core CPU.

    python -m d2g_jax.main --config=configs/tiny.py --workdir=/tmp/d2g_tiny
"""

from configs import base


def get_config():
    c = base.get_config()
    c.teacher.tiny = True
    c.teacher.dtype = "float32"
    c.pairs.prompts = ""  # "" with a tiny teacher = a built-in list of short captions
    c.pairs.num_pairs = 64
    c.pairs.guidance_scale = 3.0
    c.pairs.num_steps = 10
    c.pairs.resolution = 64  # tiny VAE downscales by 4 → 16×16 latents
    c.pairs.batch_size = 16
    c.pairs.shard_size = 32
    c.log_every_s = 5.0
    return c
