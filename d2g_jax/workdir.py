"""Where a run keeps things: the one home of the workdir layout (imported by every phase; imports only models).

    <workdir>/run.json                      the run identity (train/checkpoint.py)
    <workdir>/tiny_teacher/                 configs/tiny.py's random teacher (created here, once)
    <workdir>/pairs/                        teacher ODE pairs (config.pairs.dir overrides)
    <workdir>/stage1|stage2/                checkpoints/, tb/, samples/, metrics.jsonl
    <workdir>/export/step_<N>/unet + export.json   (config.export.dir overrides export/)
    <workdir>/samples/<tag>/                --config.mode=sample (config.sample.out_dir overrides)
    <workdir>/eval/                         --config.mode=eval and periodic evaluation results
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

import jax
import ml_collections

STAGES = ("stage1", "stage2")
EXPORT_INFO = "export.json"

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
    from d2g_jax.models.tiny import write_tiny_pipeline

    if os.path.isdir(path):  # a creation killed half-way: nothing else ever writes here
        shutil.rmtree(path)
    tmp = path + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    write_tiny_pipeline(tmp, seed=seed)
    os.replace(tmp, path)


def teacher_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The teacher pipeline folder; with `teacher.tiny` it is created once in `<workdir>/tiny_teacher`."""
    if config.teacher.tiny:
        path = os.path.join(workdir, "tiny_teacher")
        if jax.process_index() == 0:
            _write_tiny_teacher(path, int(config.seed))
        if jax.process_count() > 1:  # one writer (process 0), the others wait for it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("d2g_jax: tiny teacher written")
        return path
    if not os.path.isfile(os.path.join(config.teacher.path, "model_index.json")):
        raise FileNotFoundError(f"config.teacher.path={config.teacher.path}: no model_index.json there; expected a "
                                "diffusers pipeline folder.")  # fmt: skip
    return config.teacher.path


def pairs_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.pairs.dir or os.path.join(workdir, "pairs")


def stage_dir(workdir: str, stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}.")
    return os.path.join(workdir, stage)


def checkpoints_dir(workdir: str, stage: str) -> str:
    return os.path.join(stage_dir(workdir, stage), "checkpoints")


def final_stage(config: ml_collections.ConfigDict) -> str:
    """The stage whose checkpoints hold the run's final generator."""
    return "stage2" if int(config.stage2.num_steps) > 0 else "stage1"


def export_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.export.dir or os.path.join(workdir, "export")


def export_step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{int(step):08d}")


def latest_export(root: str) -> str | None:
    """The `unet/` folder of the highest `step_<N>` export holding `export.json` (its completion marker), or None."""
    done = [d for d in glob.glob(os.path.join(root, "step_*")) if os.path.isfile(os.path.join(d, EXPORT_INFO))]
    if not done:
        return None
    return os.path.join(max(done, key=lambda d: int(os.path.basename(d)[len("step_") :])), "unet")


def read_export_info(unet_dir: str) -> dict[str, Any]:
    """`export.json` next to an exported `unet/` folder ({} for a plain diffusers U-Net folder)."""
    path = os.path.join(os.path.dirname(os.path.abspath(unet_dir)), EXPORT_INFO)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def sample_dir(config: ml_collections.ConfigDict, workdir: str, tag: str) -> str:
    return config.sample.out_dir or os.path.join(workdir, "samples", tag)


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, "eval")
