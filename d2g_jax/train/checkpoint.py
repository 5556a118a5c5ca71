"""Orbax checkpoints of a training stage and the run identity that guards a workdir.

A checkpoint (`<workdir>/<stage>/checkpoints/<step>/`) holds the `TrainState` (G, EMA, optimiser, step, RNG; D and
its optimiser in stage 2) and the grain iterator state of every host, written atomically by Orbax (temporary
directory renamed on commit), asynchronously, keeping the last `keep`. `<workdir>/run.json` records the config
fields that define the run, written once the first phase has started cleanly (`record_run`); a restart with a
different value, or a workdir whose checkpoints have no `run.json`, is refused with the differing fields named, so
one run's checkpoints are never continued by another — unless the field is named in `config.resume_changes`
(e.g. a lower `train.lr` after a NaN stop): then run.json takes the new value and records the change in its history.

Restores walk back (`restore_newest_readable`): a damaged newest checkpoint (truncated data, missing metadata,
emptied iterator state, a removed item) is named in one line with its error, moved aside as
`<step>.corrupt-<time>` (never deleted), and the previous one is tried; only when none restores is the run refused,
naming each. A failed asynchronous save is raised at the next step (`check_saves`), not at the next save.

Restores also verify (`integrity.py`): `Manager` writes a digest record of every file of a step after Orbax's commit
of that step (process 0, in the background like the save; `wait_until_finished` includes it). Before a step is
restored its files are checked against its record; a mismatch names the file, moves the step aside like an
unreadable one and walks back to the previous step. A step without a record (older runs, or a kill between the
commit and the record) is restored with a one-line warning.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from d2g_jax import files
from d2g_jax.train import integrity

RUN_FILE = "run.json"
# The one table of config fields that may change between restarts of one run (logging/checkpoint cadence, topology,
# phase, use modes): everything else is the run's identity (`run.json`). The cadence fields of config.train also
# apply to config.stage2, which shares them (train/stage2.py: stage2_overrides).
CADENCE = ("log_every", "eval_every", "sample_every", "ckpt_every", "stop_after")
VOLATILE = (
    "mode", "log_every_s", "mesh", "cpu", "jax_cache_dir", "export", "sample", "serve", "eval", "report",
    "resume_changes",
    "pairs.batch_size", "pairs.verify", "teacher.dtype", "stage2.log_grad_parts",
    "train.keep", "train.async_ckpt", "train.num_samples", "train.prefetch",
    *(f"{s}.{k}" for s in ("train", "stage2") for k in CADENCE),
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


HISTORY = "_history"  # run.json: the accepted resume_changes, oldest first (not part of the identity)


def _latest_step_on_disk(workdir: str) -> int | None:
    steps = []
    for stage in ("stage1", "stage2"):
        ck = os.path.join(workdir, stage, "checkpoints")
        if os.path.isdir(ck):
            steps += [int(d) for d in os.listdir(ck) if d.isdigit()]
    return max(steps) if steps else None


def resume_change_fields(config: ml_collections.ConfigDict) -> list[str]:
    return [f.strip() for f in str(config.get("resume_changes", "")).split(",") if f.strip()]


def check_run(workdir: str, config: ml_collections.ConfigDict, extra: dict[str, Any] | None = None) -> None:
    """Refuses a workdir that holds another run: a different identity in `<workdir>/run.json` (except the fields
    named in `config.resume_changes`, which are then accepted: run.json takes the new values and records the change
    with the step it applies from in its history), or checkpoints without a `run.json`. Writes nothing else; the
    identity of a new run is written by `record_run` once its phase has started cleanly.

    `extra`: identity entries not in the config (e.g. the teacher fingerprint).
    """
    ident = _identity(config, extra)
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        for stage in ("stage1", "stage2"):
            ck = os.path.join(workdir, stage, "checkpoints")
            if os.path.isdir(ck) and any(d.isdigit() for d in os.listdir(ck)):
                raise RunMismatchError(f"{ck}: holds checkpoints but {path} is missing, so they cannot be matched to "
                                       "this config; use a new --workdir. Nothing was changed.")  # fmt: skip
        return
    with open(path) as f:
        old = json.load(f)
    fields = {k: v for k, v in old.items() if not k.startswith("_")}
    diff = sorted(k for k in set(fields) | set(ident) if fields.get(k, "<absent>") != ident.get(k, "<absent>"))
    allowed = set(resume_change_fields(config))
    refused = [k for k in diff if k not in allowed]
    if refused:
        shown = "; ".join(f"{k}: run has {fields.get(k, '<absent>')!r}, now {ident.get(k, '<absent>')!r}"
                          for k in refused[:8])  # fmt: skip
        raise RunMismatchError(
            f"{path}: this workdir holds another run ({len(refused)} field(s) differ: {shown}). Use a new --workdir, "
            "restore the original values to resume it, or accept the change deliberately with "
            f"--config.resume_changes={','.join(refused)}. Nothing was changed."
        )
    if diff and jax.process_index() == 0:
        history = list(old.get(HISTORY, []))
        history.append({"from_step": _latest_step_on_disk(workdir), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "changes": {k: [fields.get(k), ident.get(k)] for k in diff}})  # fmt: skip
        files.atomic_write_json(path, {**ident, HISTORY: history}, sort_keys=True)
        logging.warning("run.json: accepted %s on resume (config.resume_changes), from step %s",
                        {k: [fields.get(k), ident.get(k)] for k in diff}, history[-1]["from_step"])  # fmt: skip


def record_run(workdir: str, config: ml_collections.ConfigDict, extra: dict[str, Any] | None = None) -> None:
    """Writes `<workdir>/run.json` for a new run (process 0), after `check_run` and once the phase has started
    cleanly, so a config that fails validation or set-up never claims the workdir."""
    path = os.path.join(workdir, RUN_FILE)
    if jax.process_index() == 0 and not os.path.isfile(path):
        os.makedirs(workdir, exist_ok=True)
        files.atomic_write_json(path, _identity(config, extra), sort_keys=True)


def _identity(config: ml_collections.ConfigDict, extra: dict[str, Any] | None) -> dict[str, Any]:
    ident = run_identity(config)
    ident.update(extra or {})
    return json.loads(json.dumps(ident))


class Manager(ocp.CheckpointManager):
    """Orbax's manager + the digest record of every step it saves (`integrity.write_record`), written by process 0
    on one background thread once Orbax has committed that step: the step time does not grow. A kill between the
    commit and the record leaves a step without a record (restored unverified); `wait_until_finished` (called by
    Orbax before each save, and by `close`) includes the pending records; `check_for_errors` raises a failed one."""

    def __init__(self, directory: str, options: ocp.CheckpointManagerOptions):
        super().__init__(directory, options=options, item_names=("state", "data"))
        self._records: Any = None  # the executor, made on the first save
        self._pending: list[Any] = []

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        saved = super().save(step, *args, **kwargs)
        if saved and jax.process_index() == 0:
            if self._records is None:
                import concurrent.futures

                self._records = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="d2g_digest_record")
            self._pending.append(self._records.submit(self._record, step))
        return saved

    def _record(self, step: int) -> None:
        ocp.CheckpointManager.wait_until_finished(self)  # Orbax's commit of `step` (not ours: that waits for this)
        folder = os.path.join(str(self.directory), str(step))
        try:
            integrity.write_record(folder, step=int(step))
        except FileNotFoundError:
            if os.path.isdir(folder):
                raise  # else: removed meanwhile by a later save's max_to_keep: nothing to record

    def _raise_done(self, wait: bool) -> None:
        done = [f for f in self._pending if wait or f.done()]
        self._pending = [f for f in self._pending if f not in done]
        for f in done:
            f.result()

    def wait_until_finished(self) -> None:
        super().wait_until_finished()
        self._raise_done(wait=True)

    def check_for_errors(self) -> None:
        super().check_for_errors()
        self._raise_done(wait=False)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._records is not None:
                self._records.shutdown(wait=True)
                self._records = None


def manager(directory: str, keep: int, async_save: bool) -> Manager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return Manager(os.path.abspath(directory), opts)


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


class CheckpointError(RuntimeError):
    """No readable checkpoint, or a checkpoint could not be saved."""


def _one_line(e: BaseException, limit: int = 240) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'…' if len(msg) > limit else ''}"


def move_aside(directory: str, step: int) -> str:
    """Renames `<directory>/<step>` to `<step>.corrupt-<time>` (process 0; never deleted; Orbax ignores it)."""
    src = os.path.join(directory, str(step))
    dst = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0 and os.path.isdir(src):
        n = 1
        while os.path.exists(dst):
            dst, n = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        os.replace(src, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"d2g_jax: checkpoint {step} moved aside")
    return dst


Restore = Callable[[ocp.CheckpointManager, int], Any]


def restore_newest_readable(directory: str, make_manager: Callable[[], ocp.CheckpointManager],
                            restore_fn: Restore) -> tuple[Any, int | None, Any]:  # fmt: skip
    """`(manager, step, restore_fn(manager, step))` for the newest checkpoint in `directory` that matches its digest
    record (`integrity.check_folder`; one without a record is restored with a warning) and restores; each newer one
    that does not is named with the damaged file or its error in one line and moved aside (`move_aside`).
    `(manager, None, None)` when there is no checkpoint; `CheckpointError` naming every failure when none is
    usable."""
    failures = []
    while True:
        mgr = make_manager()
        step = mgr.latest_step()
        if step is None:
            if failures:
                raise CheckpointError(
                    f"{directory}: no readable checkpoint; each was moved aside (kept, never deleted): "
                    + "; ".join(failures) + ". Copy an intact checkpoint back (e.g. from where this run was "
                    "copied from) or use a new --workdir; rerunning as is starts this stage afresh."
                )  # fmt: skip
            return mgr, None, None
        folder = os.path.join(directory, str(step))
        try:
            verified = integrity.check_folder(folder)
        except integrity.IntegrityError as e:
            mgr.close()
            dst = move_aside(directory, step)
            logging.warning("checkpoint %s unreadable (damaged: %s); moved aside to %s, walking back to the previous "
                            "step", folder, e, dst)  # fmt: skip
            failures.append(f"step {step} (damaged: {e}) → {dst}")
            continue
        if verified == integrity.UNVERIFIED:
            logging.warning("checkpoint %s has no digest record (a run older than the records, or killed between "
                            "its save and its record): restoring it unverified", folder)  # fmt: skip
        try:
            return mgr, step, restore_fn(mgr, step)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways (OCDBT, JSON, tree, missing)
            reason = _one_line(e)
            mgr.close()
            dst = move_aside(directory, step)
            logging.warning("checkpoint %s unreadable (%s); moved aside to %s, trying the previous one",
                            os.path.join(directory, str(step)), reason, dst)  # fmt: skip
            failures.append(f"step {step} ({reason}) → {dst}")


def check_saves(mgr: ocp.CheckpointManager) -> None:
    """Raises the error of a failed asynchronous save (if any) now, at the next step, instead of at the next save."""
    mgr.check_for_errors()
