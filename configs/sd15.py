"""SD-CFG-3 (paper Table A1): distil Stable Diffusion 1.5 with CFG 3 on LAION-aesthetic-6.25 prompts.

    python -m d2g_jax.main --config=configs/sd15.py --workdir=/runs/sd15_cfg3 \
        --config.teacher.path=/models/stable-diffusion-v1-5 --config.pairs.prompts=/data/laion_a625.parquet

FID-30k / CLIP-30k / Precision & Recall-10k on COCO2014 val (Tables 1-3) of the exported generator:

    python -m d2g_jax.main --config=configs/sd15.py --workdir=/runs/sd15_cfg3 --config.mode=eval \
        --config.teacher.path=/models/stable-diffusion-v1-5 \
        --config.eval.prompts=/data/coco/annotations/captions_val2014.json --config.eval.real=/data/coco/val2014 \
        --config.eval.inception=/models/eval/inception-2015-12-05.pt \
        --config.eval.clip=/models/CLIP-ViT-g-14-laion2B-s12B-b42K
"""

from configs import base


def get_config():
    c = base.get_config()
    c.pairs.guidance_scale = 3.0
    c.pairs.num_pairs = 3_000_000
    c.pairs.resolution = 512
    c.train.lr_reading = "stage_switch"  # Table A1 "1e-4→1e-5" read like its batch arrows: 1e-4 in stage 1, 1e-5 in 2
    c.disc.r1_scope = "device"  # "a single sample of each mini-batch": one R1 sample per device (configs/base.py)
    return c
