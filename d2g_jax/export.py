"""The export phase: the EMA generator of the final stage's latest checkpoint → a diffusers U-Net folder.

    <export root>/step_<N>/unet/        diffusion_pytorch_model.safetensors + config.json (diffusers' from_pretrained)
    <export root>/step_<N>/export.json  T, α_T, σ_T, the x0 formula, the stage, the teacher, the run identity

Only the EMA is restored (an Orbax partial restore into the U-Net's abstract shapes and shardings): no loss network,
no data loader, no optimiser state is built or read. `export.json` is the completion marker, written atomically
after the weights; every host waits at a barrier until it exists, so sample/eval on any host find a complete folder.
A step folder that holds another run's export (its `export.json` names another run or teacher) is refused, never
skipped or overwritten.

`export.json` also holds the sha256 of every exported file (`digests`, train/integrity.py); `verify_export` checks
them before the export is used (sample, eval, report, an export found on a rerun) and refuses a changed file by name
with the fix. An export without digests (older runs) is used with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from d2g_jax import files
from d2g_jax import sharding as shd
from d2g_jax import workdir as wd
from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables, save_unet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.weights import read_config
from d2g_jax.sampling import DDIMSchedule, _vae_scale_factor, pipeline_fingerprint
from d2g_jax.train import checkpoint as ckpt
from d2g_jax.train import integrity
from d2g_jax.train.generator import Generator


class ExportError(RuntimeError):
    """Nothing to export, or the target belongs to another run."""


def run_digest(workdir: str) -> str | None:
    """sha256 of the workdir's `run.json` (the run identity), or None without one."""
    path = os.path.join(workdir, ckpt.RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def restore_ema(mgr: Any, step: int, abstract_ema: Any) -> Any:
    """The `ema` subtree of the TrainState saved at `step`, into `abstract_ema`'s shardings (a partial restore)."""
    import orbax.checkpoint as ocp

    item = {"ema": abstract_ema}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    return mgr.restore(step, args=ocp.args.Composite(state=args))["state"]["ema"]


def export_generator(config: ml_collections.ConfigDict, workdir: str, teacher_folder: str) -> str:
    """Exports the final stage's newest readable checkpoint (see the module docstring); returns the `unet/` folder."""
    stage = wd.final_stage(config)
    directory = wd.checkpoints_dir(workdir, stage)
    latest = ckpt.manager(directory, 1, False).latest_step() if os.path.isdir(directory) else None
    if latest is None:
        raise ExportError(f"{directory}: no checkpoint to export; train first (--config.mode=train or all).")
    identity = {"run": run_digest(workdir), "teacher_fingerprint": pipeline_fingerprint(teacher_folder)}
    done = _existing_export(config, workdir, latest, stage, identity)
    if done:
        return done
    unet_cfg = UNetConfig.from_diffusers(read_config(os.path.join(teacher_folder, "unet")),
                                         source=os.path.join(teacher_folder, "unet", "config.json"))  # fmt: skip
    unet = UNet2DConditionModel(unet_cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    boxed = abstract_variables(unet)["params"]
    sh = shd.param_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), sh)
    _, step, ema = ckpt.restore_newest_readable(directory, lambda: ckpt.manager(directory, 1, False),
                                                lambda mgr, s: restore_ema(mgr, s, abstract))  # fmt: skip
    if step is None:
        raise ExportError(f"{directory}: no checkpoint to export; train first (--config.mode=train or all).")
    if step != latest:  # the newest was unreadable and moved aside
        done = _existing_export(config, workdir, step, stage, identity)
        if done:
            return done
    out = wd.export_step_dir(wd.export_root(config, workdir), step)
    unet_dir = os.path.join(out, "unet")
    info_path = os.path.join(out, wd.EXPORT_INFO)
    # FSDP shards of other hosts are not addressable here: gather the full EMA on every process.
    ema = jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable or x.is_fully_replicated
                       else multihost_utils.process_allgather(x, tiled=True), ema)  # fmt: skip
    gen = Generator(unet, DDIMSchedule.from_pipeline(teacher_folder), _vae_scale_factor(teacher_folder))
    if jax.process_index() == 0:
        if os.path.isdir(unet_dir):  # an export killed half-way (no export.json): only this phase writes here
            shutil.rmtree(unet_dir)
        os.makedirs(out, exist_ok=True)
        save_unet(unet_dir, unet_cfg, {"params": ema}, dtype=jnp.dtype(config.export.dtype))
        exported = [os.path.join("unet", f) for f in integrity.tree_files(unet_dir)]
        digests = {"algorithm": integrity.ALGORITHM, "files": integrity.digest_files(out, exported)}
        eps_pred = gen.schedule.prediction_type == "epsilon"
        x0 = "(z - sigma_T * eps) / alpha_T" if eps_pred else "alpha_T * z - sigma_T * v"
        info = {"step": int(step), "stage": stage, "teacher": os.path.abspath(teacher_folder), **identity,
                "timestep": gen.t, "alpha_T": gen.alpha_sigma[0], "sigma_T": gen.alpha_sigma[1],
                "prediction_type": gen.schedule.prediction_type, "x0": x0, "digests": digests}  # fmt: skip
        files.atomic_write_json(info_path, info)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("d2g_jax: export written")
    logging.info("export: EMA generator of %s step %d → %s", stage, step, unet_dir)
    return unet_dir


def _existing_export(config: ml_collections.ConfigDict, workdir: str, step: int, stage: str,
                     identity: dict[str, Any]) -> str | None:  # fmt: skip
    """The `unet/` folder when `step` is already exported by this run; refuses a step folder of another run."""
    out = wd.export_step_dir(wd.export_root(config, workdir), step)
    info_path = os.path.join(out, wd.EXPORT_INFO)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            old = json.load(f)
        theirs = {k: old.get(k) for k in identity}
        if theirs != identity or old.get("stage") != stage:
            raise ExportError(f"{out}: holds another run's export ({info_path}: run {theirs['run']}, stage "
                              f"{old.get('stage')}; this run is {identity['run']}, {stage}). Set config.export.dir "
                              "to a folder of this run, or move that export away.")  # fmt: skip
        verify_export(os.path.join(out, "unet"))
        logging.info("export: %s already holds this run's step %d", out, step)
        return os.path.join(out, "unet")
    if os.path.isdir(out) and jax.process_index() == 0:
        leftovers = sorted(set(os.listdir(out)) - {"unet"})
        if leftovers:
            raise ExportError(f"{out}: exists and holds {leftovers} but no {wd.EXPORT_INFO}: not an export of this "
                              "run. Set config.export.dir to another folder, or move it away.")  # fmt: skip
    return None


def verify_export(unet_dir: str) -> str | None:
    """Checks an exported `unet/` folder against the digests in its `export.json`: `"verified"`, `"unverified"` (an
    export written before digests were recorded: used, with a warning), None for a folder that is not an export
    (no `export.json`: e.g. a teacher's own `unet/`); `ExportError` naming a changed, missing or added file."""
    step_dir = os.path.dirname(os.path.abspath(unet_dir))
    info_path = os.path.join(step_dir, wd.EXPORT_INFO)
    if not os.path.isfile(info_path):
        return None
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{info_path}: unreadable ({e}); delete {step_dir} and rerun --config.mode=export to "
                          "write it again from the checkpoint.") from None  # fmt: skip
    digests = info.get("digests")
    if not digests:
        logging.warning("export %s: its %s records no digests (an export older than them): using it unverified",
                        step_dir, wd.EXPORT_INFO)  # fmt: skip
        return integrity.UNVERIFIED
    table = digests.get("files", {})
    try:
        if digests.get("algorithm") != integrity.ALGORITHM:
            raise integrity.IntegrityError(f"{info_path}: digests are {digests.get('algorithm')}, this code checks "
                                           f"{integrity.ALGORITHM}", info_path)  # fmt: skip
        integrity.check_files(step_dir, table)
        extra = sorted(f for f in (os.path.join("unet", x) for x in integrity.tree_files(unet_dir)) if f not in table)
        if extra:
            raise integrity.IntegrityError(f"{os.path.join(step_dir, extra[0])}: not in {wd.EXPORT_INFO}'s digests "
                                           "(added after the export)", os.path.join(step_dir, extra[0]))  # fmt: skip
    except integrity.IntegrityError as e:
        raise ExportError(f"export {step_dir} is damaged: {e}. Delete {step_dir} (or copy an intact export "
                          "back) and rerun --config.mode=export to write it again from the checkpoint.") from None
    return integrity.VERIFIED
