"""Orbax checkpoints of a training stage and the run identity that guards a workdir.

A checkpoint (`<workdir>/<stage>/checkpoints/<step>/`) holds the `TrainState` (G, EMA, optimiser, step, RNG; D and
its optimiser in stage 2) and the grain iterator state of every host, written atomically by Orbax (temporary
directory renamed on commit), asynchronously, keeping the last `keep`. `<workdir>/run.json` records the config
fields that define the run; a restart with a different value, or a workdir whose checkpoints have no `run.json`,
is refused with the differing fields named, so one run's checkpoints are never continued by another.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

RUN_FILE = "run.json"
# Config fields that may change between restarts of one run (logging/checkpoint cadence, topology, phase).
VOLATILE = (
    "mode", "log_every_s", "mesh", "export", "sample", "eval",
    "pairs.batch_size", "teacher.dtype",
    "train.log_every", "train.eval_every", "train.sample_every", "train.ckpt_every", "train.keep",
    "train.async_ckpt", "train.num_samples", "train.prefetch", "train.stop_after",
    "stage2.log_every", "stage2.eval_every", "stage2.sample_every", "stage2.ckpt_every", "stage2.stop_after",
)  # fmt: skip


class RunMismatchError(ValueError):
    """The workdir belongs to a different run."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The flattened config minus `VOLATILE` fields (JSON-able)."""
    flat = _flatten(json.loads(config.to_json()))
    return {k: v for k, v in sorted(flat.items()) if not any(k == p or k.startswith(p + ".") for p in VOLATILE)}


def check_run(workdir: str, config: ml_collections.ConfigDict, extra: dict[str, Any] | None = None) -> None:
    """Writes `<workdir>/run.json` on the first run; on later runs refuses a different identity.

    `extra`: identity entries not in the config (e.g. the teacher fingerprint).
    """
    ident = run_identity(config)
    ident.update(extra or {})
    ident = json.loads(json.dumps(ident))
    path = os.path.join(workdir, RUN_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(ident) if old.get(k, "<absent>") != ident.get(k, "<absent>"))
        if diff:
            shown = "; ".join(f"{k}: run has {old.get(k, '<absent>')!r}, now {ident.get(k, '<absent>')!r}"
                              for k in diff[:8])  # fmt: skip
            raise RunMismatchError(
                f"{path}: this workdir holds another run ({len(diff)} field(s) differ: {shown}). Use a new "
                "--workdir, or restore the original values to resume it. Nothing was changed."
            )
        return
    for stage in ("stage1", "stage2"):
        ck = os.path.join(workdir, stage, "checkpoints")
        if os.path.isdir(ck) and os.listdir(ck):
            raise RunMismatchError(f"{ck}: holds checkpoints but {path} is missing, so they cannot be matched to "
                                   "this config; use a new --workdir. Nothing was changed.")  # fmt: skip
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(ident, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, iterator: Any) -> None:
    args = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(iterator)
    mgr.save(step, args=ocp.args.Composite(**args), force=True)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state: Any, iterator: Any) -> Any:
    """Restores the state into `abstract_state`'s shapes/shardings and (in place) the iterator's position."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(iterator)
    return mgr.restore(step, args=ocp.args.Composite(**args))["state"]
