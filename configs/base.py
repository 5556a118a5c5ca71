"""Every default of a d2g_jax run, one commented field each (paper: Table A1, §4 "Training details").

Experiment files (`sd15.py`, `sd15_cfg8.py`, `sdxl.py`, `tiny.py`) call `get_config()` and override a few fields.
Any field can be overridden on the command line: `--config.pairs.guidance_scale=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Which phase to run: "all" runs pairs → train (stage 1) → export, each resuming where it stopped;
    # "pairs", "train" or "export" runs that phase alone.
    c.mode = "all"
    c.seed = 0  # global seed: pair i's noise is fold_in(PRNGKey(seed), i), so any pair can be regenerated

    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""  # diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder[_2]/, ...)
    c.teacher.variant = ""  # "" = plain weights, else a diffusers variant such as "fp16"
    c.teacher.dtype = "bfloat16"  # teacher compute dtype (Table A1: bfloat16); params stay float32 on device
    # Create a random tiny SD-architecture pipeline in <workdir>/tiny_teacher and use it as the teacher
    # (configs/tiny.py: the whole job on a CPU in minutes, no downloaded weights).
    c.teacher.tiny = False

    c.pairs = ml_collections.ConfigDict()
    c.pairs.prompts = ""  # .txt (one per line) / .jsonl / .parquet file, or "tfds:NAME[:SPLIT[:FEATURE]]"
    c.pairs.prompt_field = ""  # JSONL key / parquet column ("" = first of text, caption, prompt)
    c.pairs.num_pairs = 3_000_000  # Table A1, SD-CFG-3: 3.0M pairs
    c.pairs.guidance_scale = 3.0  # Table A1 / §4: SD-CFG-3 (CFG scale of the teacher ODE)
    c.pairs.num_steps = 50  # Table A1: 50 DDIM steps
    c.pairs.resolution = 512  # image side in pixels; latents are resolution / vae_scale_factor (64 for SD1.5)
    c.pairs.batch_size = 64  # global batch of the jitted DDIM scan (split over all devices)
    c.pairs.shard_size = 4096  # pairs per ArrayRecord shard
    c.pairs.dir = ""  # "" = <workdir>/pairs

    # Stage 1 (ODE distillation; Table A1 "First stage"). Values: SD-CFG-3.
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 150_000  # Table A1: first-stage iterations (SD-CFG-3 150k, SD-CFG-8 50k, SDXL 20k)
    c.train.batch_size = 256  # global batch (Table A1: 256; SD-CFG-8 2048→1024, SDXL 1024→512, stage 1→2)
    c.train.grad_accum = 1  # micro-batches per step (Table A1: 1); batch_size is split into them
    c.train.lr = 1e-4  # Table A1: G learning rate 1e-4 → 1e-5
    c.train.lr_end = 1e-5
    c.train.lr_schedule = "cosine"  # shape of the 1e-4 → 1e-5 decay over num_steps (paper: unspecified)
    c.train.warmup_steps = 0
    c.train.b1 = 0.9  # Table A1: G β1
    c.train.b2 = 0.999  # Table A1: G β2
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-2  # Table A1 (decoupled, AdamW-style)
    c.train.weight_decay_attention = 1e-5  # Table A1: on attention (attn1/attn2) parameters
    c.train.grad_clip = 0.0  # global-norm gradient clipping; 0 = off (paper: none stated)
    c.train.ema_start = 4000  # Table A1: G EMA start 4k
    c.train.ema_beta = 0.9999  # Table A1: G EMA β
    c.train.dtype = "bfloat16"  # Table A1: bfloat16 compute; master weights and optimiser state float32
    c.train.remat = "none"  # U-Net block remat: "none" or a jax.checkpoint_policies name (e.g. nothing_saveable)
    c.train.holdout = 256  # last pairs of the dataset held out for eval metrics and the sample grid
    c.train.num_samples = 8  # columns of the teacher-vs-student sample grid
    c.train.log_every = 100  # steps between train metric writes (TensorBoard, log, <stage>/metrics.jsonl)
    c.train.eval_every = 2000  # steps between held-out evaluations (0 = never)
    c.train.sample_every = 2000  # steps between sample grids (0 = never)
    c.train.ckpt_every = 2000  # steps between checkpoints (and at the last step)
    c.train.stop_after = 0  # stop this process after that many steps, checkpointed (preemption drill); 0 = off
    c.train.keep = 3  # checkpoints kept
    c.train.async_ckpt = True  # Orbax asynchronous saves
    c.train.prefetch = 256  # records buffered by the grain reader

    # The distillation loss (Table A1 "L_distil").
    c.loss = ml_collections.ConfigDict()
    # e_latent_lpips | e_latent_lpips_star (SD-CFG-3: mean of E-LatentLPIPS and LatentLPIPS) | latent_lpips |
    # lpips_pixel (VAE decode + LPIPS-VGG, ablation) | mse
    c.loss.kind = "e_latent_lpips_star"
    c.loss.augment = "bgo"  # Table A1, SD-CFG-3: bg + cutout (SD-CFG-8 / SDXL: bgco)
    c.loss.l1 = True  # the official E-LatentLPIPS adds mean |x − y| of the raw latents
    c.loss.weight = 1.0  # Table A1: L_distil strength
    c.loss.encoder = "sd15"  # latent space of the LatentVGG checkpoint: sd15 | sd21 | sdxl | sd3 | flux
    c.loss.ckpt_dir = ""  # folder with {encoder}_latent_vgg16.pth.tar and {encoder}_latest_vgg16_tuned.pth
    c.loss.random_weights = False  # random LatentVGG (tiny/debug runs only, no checkpoint files)
    c.loss.dtype = ""  # "" = train.dtype
    c.loss.pixel_vgg16 = ""  # lpips_pixel only: torchvision vgg16-397923af.pth
    c.loss.pixel_lin = ""  # lpips_pixel only: lpips weights/v0.1/vgg.pth

    # Export of the EMA generator as a diffusers U-Net folder (<workdir>/export/unet).
    c.export = ml_collections.ConfigDict()
    c.export.dtype = "float32"  # safetensors dtype: float32 | float16 | bfloat16
    c.export.dir = ""  # "" = <workdir>/export

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = all devices not used by fsdp
    c.mesh.fsdp = 1  # parameter-sharding axis size

    c.log_every_s = 30.0  # progress/ETA report period (seconds)
    return c
