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
    c.pairs.resolution = 32  # tiny VAE downscales by 4 → 8×8 latents
    c.pairs.batch_size = 16
    c.pairs.shard_size = 32
    c.train.num_steps = 60
    c.train.batch_size = 8
    c.train.lr = 1e-4
    c.train.lr_end = 1e-5
    c.train.ema_start = 20
    c.train.ema_beta = 0.9
    c.train.dtype = "float32"
    c.train.holdout = 8
    c.train.num_samples = 4
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.sample_every = 30
    c.train.ckpt_every = 30
    c.train.prefetch = 16
    c.stage2.num_steps = 20
    c.stage2.batch_size = 8
    c.stage2.log_every = 10
    c.stage2.eval_every = 20
    c.stage2.sample_every = 20
    c.stage2.ckpt_every = 10
    c.disc.r1_interval = 4  # exercise the lazy R1 branch within the few tiny steps
    c.loss.random_weights = True  # no LatentVGG checkpoint needed
    # --config.mode=sample / eval on the tiny run: built-in prompts, random-weight extractors (smoke test only).
    c.sample.prompt = "a photo of a cat|a red car on a street|a bowl of fruit|a mountain lake at dawn"
    c.sample.teacher = True
    c.eval.num_images = 16
    c.eval.metrics = "clip,dreamsim,dreamdiv"  # fid,pr need real images: --config.eval.real=<folder>
    c.eval.dreamsim_num = 16
    c.eval.dreamdiv_prompts, c.eval.dreamdiv_per_prompt = 4, 4
    c.eval.random_extractors = True
    c.eval.dreamsim_type = "open_clip_vitb32"
    c.eval.batch_size = 8
    c.log_every_s = 30.0  # one progress line per phase per 30 s (the console stays short)
    return c
