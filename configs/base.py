"""Every default of a d2g_jax run, one commented field each (paper: Table A1, §4 "Training details").

Experiment files (`sd15.py`, `sd15_cfg8.py`, `sdxl.py`, `tiny.py`) call `get_config()` and override a few fields.
Any field can be overridden on the command line: `--config.pairs.guidance_scale=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Which phase to run: "all" runs every phase in order, each resuming where it stopped
    # (today: pairs; stage 1/2 training, export and sampling land with their issues); "pairs" runs one phase.
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

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = all devices not used by fsdp
    c.mesh.fsdp = 1  # parameter-sharding axis size

    c.log_every_s = 30.0  # progress/ETA report period (seconds)
    return c
