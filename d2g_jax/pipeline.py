"""The job behind `d2g_jax.main`: teacher pairs → stage 1 → stage 2 → export of the EMA generator.

Each phase is resumable: rerunning the same command skips what is complete and continues what is not.
`config.mode` selects one phase ("pairs", "train" = both stages, "export") or all of them in order ("all");
"sample" (d2g_jax/generate.py) and "eval" (d2g_jax/eval/evaluate.py) use the exported generator afterwards.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

PHASES = ("pairs", "train", "export")  # in order; "all" runs each
USE_PHASES = ("sample", "eval")  # use the exported generator; never part of "all"

# Prompts for the tiny teacher (configs/tiny.py), which needs no dataset on disk.
TINY_PROMPTS = (
    "a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn", "a city at night",
    "a dog running on a beach", "an oil painting of a ship", "a bird on a branch", "a cup of coffee",
    "a snowy forest", "a portrait of an old man", "a field of sunflowers", "a castle on a hill",
    "a plate of pasta", "a robot in a garden", "a sailboat at sunset",
)  # fmt: skip


def _write_tiny_teacher(path: str, seed: int) -> None:
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return
    import shutil

    from d2g_jax.models.tiny import write_tiny_pipeline

    if os.path.isdir(path):  # a creation killed half-way: nothing else ever writes here
        shutil.rmtree(path)
    tmp = path + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    write_tiny_pipeline(tmp, seed=seed)
    os.replace(tmp, path)
    logging.info("wrote a random tiny SD pipeline to %s", path)


def teacher_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The teacher pipeline folder; with `teacher.tiny` it is created once in `<workdir>/tiny_teacher`."""
    if config.teacher.tiny:
        if config.teacher.path:
            raise ValueError("config.teacher.tiny=True and config.teacher.path are exclusive: set one of them.")
        path = os.path.join(workdir, "tiny_teacher")
        if jax.process_count() > 1:  # one writer (process 0), the others wait for it
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                _write_tiny_teacher(path, config.seed)
            multihost_utils.sync_global_devices("d2g_jax: tiny teacher written")
            return path
        _write_tiny_teacher(path, config.seed)
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


def pairs_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.pairs.dir or os.path.join(workdir, "pairs")


def _trainer(config: ml_collections.ConfigDict, workdir: str, stage: str = "stage1"):
    from d2g_jax.data.pairs_writer import read_manifest
    from d2g_jax.train.stage2 import Stage2Trainer
    from d2g_jax.train.trainer import Trainer

    path = teacher_path(config, workdir)
    pdir = pairs_dir(config, workdir)
    manifest = read_manifest(pdir)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"{pdir}: no complete pair set; run the pairs phase first "
                                "(--config.mode=pairs, or --config.mode=all).")  # fmt: skip
    return (Stage2Trainer if stage == "stage2" else Trainer)(config, workdir, path, pdir)


def final_stage(config: ml_collections.ConfigDict) -> str:
    return "stage2" if int(config.stage2.num_steps) > 0 else "stage1"


def run_train(config: ml_collections.ConfigDict, workdir: str):
    """Phase 2: stage 1 (ODE distillation with E-LatentLPIPS), then stage 2 (+ the conditional GAN) when
    `config.stage2.num_steps > 0`; each resumes from its latest checkpoint.

    Returns `(trainer, state, finished)`; `finished` is False when a stage stopped early (stop_after or a
    preemption signal, checkpointed): the job then ends there and the same command continues it.
    """
    stages = ["stage1"] if not config.stage2.init_from else []
    if final_stage(config) == "stage2":
        stages.append("stage2")
    if not stages:
        raise ValueError("config.stage2.init_from is set (stage 1 comes from another run) but config.stage2.num_steps "
                         "is 0: nothing to train.")  # fmt: skip
    trainer = state = None
    for stage in stages:
        logging.info("=== %s", stage)
        trainer = _trainer(config, workdir, stage)
        state = trainer.run()
        if int(jax.device_get(state.step)) < int(trainer.t.num_steps):
            logging.warning("%s stopped at step %d of %d (checkpointed); rerun the same command to continue.",
                            stage, int(jax.device_get(state.step)), int(trainer.t.num_steps))  # fmt: skip
            return trainer, state, False
        trainer.mgr.wait_until_finished()
    return trainer, state, True


def run_export(config: ml_collections.ConfigDict, workdir: str, trainer=None, state=None) -> str:
    """Phase 3: the EMA generator of the latest checkpoint → `<export.dir>/step_<N>/unet` (diffusers format).

    The folder is loaded by `diffusers.UNet2DConditionModel.from_pretrained`; sample it in one step at the
    teacher's last timestep (x0 = (z − σ_T ε) / α_T). An existing export of the same step is kept as it is.
    """
    import json

    from d2g_jax.models.unet import save_unet

    if trainer is None:
        trainer = _trainer(config, workdir, final_stage(config))
    if state is None:
        step = trainer.mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{trainer.dir}/checkpoints: no checkpoint to export; train first.")
        state = trainer.restore_or_init()
    step = int(jax.device_get(state.step))
    out = os.path.join(config.export.dir or os.path.join(workdir, "export"), f"step_{step:08d}")
    unet_dir = os.path.join(out, "unet")
    if os.path.isfile(os.path.join(out, "export.json")):
        logging.info("export: %s already holds step %d", out, step)
        return unet_dir
    from jax.experimental import multihost_utils

    # FSDP shards of other hosts are not addressable here: gather the full EMA params on every process.
    ema = jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable or x.is_fully_replicated
                       else multihost_utils.process_allgather(x, tiled=True), state.ema)  # fmt: skip
    if jax.process_index() == 0:
        if os.path.isdir(unet_dir):  # an export killed half-way (no export.json): nothing else writes here
            import shutil

            shutil.rmtree(unet_dir)
        save_unet(unet_dir, trainer.unet.config, {"params": ema}, dtype=jnp.dtype(config.export.dtype))
        gen = trainer.gen
        info = {"step": step, "stage": trainer.stage, "teacher": os.path.abspath(trainer.teacher_folder),
                "timestep": gen.t, "alpha_T": gen.alpha_sigma[0], "sigma_T": gen.alpha_sigma[1],
                "prediction_type": gen.schedule.prediction_type,
                "x0": "(z - sigma_T * eps) / alpha_T" if gen.schedule.prediction_type == "epsilon"
                else "alpha_T * z - sigma_T * v"}  # fmt: skip
        with open(os.path.join(out, "export.json"), "w") as f:
            json.dump(info, f, indent=1)
    logging.info("export: EMA generator of step %d → %s", step, unet_dir)
    return unet_dir


def resolve_world(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """With `config.world.provider` (e.g. "d2g_jax.world.mnist"): imports that module by name, lets its
    `prepare(config, workdir)` check/write the world's files, and fills the config fields it names that are empty
    (a value given on the command line wins). Returns the config to run (locked); unchanged without a provider."""
    provider = config.world.provider
    if not provider:
        return config
    import importlib

    try:
        module = importlib.import_module(provider)
    except ImportError as e:
        raise ValueError(f"config.world.provider={provider!r}: cannot import it ({e}).") from None
    if not callable(getattr(module, "prepare", None)):
        raise ValueError(f"config.world.provider={provider!r}: the module has no prepare(config, workdir).")
    overrides = module.prepare(config, workdir)
    resolved = ml_collections.ConfigDict(config.to_dict())
    for field, value in overrides.items():
        node, *path = field.split(".")
        parent = resolved[node]
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1] if path else node
        if key not in parent:
            raise ValueError(f"{provider}.prepare returned {field!r}, which is not a config field.")
        if parent[key] in ("", None):
            parent[key] = value
        elif parent[key] != value:
            logging.info("world: keeping config.%s=%r (the world would use %r)", field, parent[key], value)
    resolved.lock()
    logging.info("world: %s from %s", provider, {k: resolved[k.split(".")[0]][k.split(".")[1]] for k in overrides})
    return resolved


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs `config.mode` ("all" or one phase) in `workdir`."""
    if not workdir:
        raise ValueError("--workdir is required.")
    os.makedirs(workdir, exist_ok=True)
    config = resolve_world(config, workdir)
    mode = config.mode
    if mode != "all" and mode not in PHASES + USE_PHASES:
        raise ValueError(f"config.mode={mode!r} is not a phase; use one of {('all',) + PHASES + USE_PHASES}.")
    if mode == "sample":
        from d2g_jax.generate import run_sample

        run_sample(config, workdir)
        return
    if mode == "eval":
        from d2g_jax.eval.evaluate import run_eval

        run_eval(config, workdir)
        return
    trainer = state = None
    if mode in ("all", "pairs"):
        logging.info("=== phase: pairs")
        run_pairs(config, workdir)
    if mode in ("all", "train"):
        logging.info("=== phase: train")
        trainer, state, finished = run_train(config, workdir)
        if not finished:
            return
    if mode in ("all", "export"):
        logging.info("=== phase: export")
        run_export(config, workdir, trainer, state)
