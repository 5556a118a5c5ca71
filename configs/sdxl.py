"""SDXL-CFG-7 (paper Table A1): SDXL-Base-1.0 with CFG 7, 8M pairs of 4×128×128 latents (1024 px).

    python -m d2g_jax.main --config=configs/sdxl.py --workdir=/runs/sdxl_cfg7 \
        --config.teacher.path=/models/stable-diffusion-xl-base-1.0 --config.pairs.prompts=/data/laion_6.parquet

Table 5 evaluation (COCO2017 5k) of the exported generator:

    python -m d2g_jax.main --config=configs/sdxl.py --workdir=/runs/sdxl_cfg7 --config.mode=eval \
        --config.teacher.path=/models/stable-diffusion-xl-base-1.0 \
        --config.eval.prompts=/data/coco/annotations/captions_val2017.json --config.eval.real=/data/coco/val2017 \
        --config.eval.inception=/models/eval/inception-2015-12-05.pt \
        --config.eval.clip=/models/CLIP-ViT-g-14-laion2B-s12B-b42K --config.eval.dreamsim=/models/dreamsim
"""

from configs import base


def get_config():
    c = base.get_config()
    c.pairs.guidance_scale = 7.0
    c.pairs.num_pairs = 8_000_000
    c.pairs.resolution = 1024
    c.train.lr_reading = "stage_switch"  # Table A1 "1e-4→1e-5" read like its batch arrows (configs/base.py)
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
    # Table 5: COCO2017, 5k image-text pairs: FID-5k, CLIP-5k, DreamDiv, DreamSim-5k (no P&R on 5k real images).
    c.eval.num_images = 5_000
    c.eval.real_name = "coco2017_val"
    c.eval.metrics = "fid,clip,dreamsim,dreamdiv"
    return c
