"""The job behind `d2g_jax.main`: teacher pairs → (stage 1 → stage 2 → export, with their issues).

Each phase is resumable: rerunning the same command skips what is complete and continues what is not.
`config.mode` selects one phase ("pairs") or all of them in order ("all").
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

PHASES = ("pairs",)  # in order; "all" runs each
FUTURE_PHASES = {"train": "stage-1/2 training", "export": "export", "sample": "sampling", "eval": "evaluation"}

# Prompts for the tiny teacher (configs/tiny.py), which needs no dataset on disk.
TINY_PROMPTS = (
    "a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn", "a city at night",
    "a dog running on a beach", "an oil painting of a ship", "a bird on a branch", "a cup of coffee",
    "a snowy forest", "a portrait of an old man", "a field of sunflowers", "a castle on a hill",
    "a plate of pasta", "a robot in a garden", "a sailboat at sunset",
)  # fmt: skip


def teacher_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The teacher pipeline folder; with `teacher.tiny` it is created once in `<workdir>/tiny_teacher`."""
    if config.teacher.tiny:
        if config.teacher.path:
            raise ValueError("config.teacher.tiny=True and config.teacher.path are exclusive: set one of them.")
        path = os.path.join(workdir, "tiny_teacher")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            from d2g_jax.models.tiny import write_tiny_pipeline

            if os.path.isdir(path):  # a creation killed half-way: nothing else ever writes here
                import shutil

                shutil.rmtree(path)
            tmp = path + ".tmp"
            if os.path.isdir(tmp):
                import shutil

                shutil.rmtree(tmp)
            write_tiny_pipeline(tmp, seed=config.seed)
            os.replace(tmp, path)
            logging.info("wrote a random tiny SD pipeline to %s", path)
        return path
    if not config.teacher.path:
        raise ValueError("config.teacher.path is empty: point it at a diffusers pipeline folder "
                         "(e.g. --config.teacher.path=/models/stable-diffusion-v1-5) or use configs/tiny.py.")  # fmt: skip
    if not os.path.isfile(os.path.join(config.teacher.path, "model_index.json")):
        raise FileNotFoundError(f"config.teacher.path={config.teacher.path}: no model_index.json there; "
                                "expected a diffusers pipeline folder.")  # fmt: skip
    return config.teacher.path


def run_pairs(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Phase 1: the teacher's DDIM ODE on (noise, prompt) → ArrayRecord pair shards (resumable)."""
    from d2g_jax.data.pairs_writer import generate_pairs
    from d2g_jax.data.prompts import read_prompts
    from d2g_jax.sampling import Teacher

    path = teacher_path(config, workdir)
    p = config.pairs
    if config.teacher.tiny and not p.prompts:
        prompts = list(TINY_PROMPTS)
    elif not p.prompts:
        raise ValueError("config.pairs.prompts is empty: give a .txt/.jsonl/.parquet file or tfds:NAME[:SPLIT[:FEATURE]].")
    else:
        prompts = read_prompts(p.prompts, field=p.prompt_field or None)
    teacher = Teacher.from_pipeline(path, dtype=jnp.dtype(config.teacher.dtype))
    if p.resolution % teacher.vae_scale_factor:
        raise ValueError(f"config.pairs.resolution={p.resolution} is not a multiple of the VAE's downscale "
                         f"factor {teacher.vae_scale_factor}.")  # fmt: skip
    side = p.resolution // teacher.vae_scale_factor
    if p.batch_size % jax.device_count():
        raise ValueError(f"config.pairs.batch_size={p.batch_size} must be a multiple of the {jax.device_count()} "
                         "devices (the teacher scan is split over all of them).")  # fmt: skip
    out_dir = p.dir or os.path.join(workdir, "pairs")
    manifest = generate_pairs(
        out_dir, teacher, prompts, guidance_scale=p.guidance_scale, num_steps=p.num_steps, latent_size=(side, side),
        seed=config.seed, num_pairs=p.num_pairs, batch_size=p.batch_size // jax.process_count(),
        shard_size=p.shard_size, log_every_s=config.log_every_s,
    )  # fmt: skip
    logging.info("pairs: %s", {k: manifest.get(k) for k in ("num_pairs", "complete")})
    return manifest


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs `config.mode` ("all" or one phase) in `workdir`."""
    if not workdir:
        raise ValueError("--workdir is required.")
    os.makedirs(workdir, exist_ok=True)
    mode = config.mode
    if mode in FUTURE_PHASES:
        raise ValueError(f"config.mode={mode!r}: {FUTURE_PHASES[mode]} is not part of this version yet; "
                         f"available: {('all',) + PHASES}.")  # fmt: skip
    if mode != "all" and mode not in PHASES:
        raise ValueError(f"config.mode={mode!r} is not a phase; use one of {('all',) + PHASES}.")
    for phase in PHASES:
        if mode in ("all", phase):
            logging.info("=== phase: %s", phase)
            {"pairs": run_pairs}[phase](config, workdir)
