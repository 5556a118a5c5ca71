"""Stage 1 of Diffusion2GAN (paper §3.1–3.2, Table A1): ODE distillation of the teacher into a one-step generator.

    L = E-LatentLPIPS(G(z, c), x0_teacher)   (+ the official L1 term; E-LatentLPIPS* for SD-CFG-3)

`Trainer(config, workdir, teacher_folder, pairs_dir)` is the set-up: models, loss, data, shardings and the jitted
step (`d2g_jax/train/steps.py`), built from the config and the teacher folder; `run(jobs)` is the loop. It restores
the latest checkpoint of `<workdir>/stage1/` if there is one and trains to `config.train.num_steps`:

* the step is one jitted pure function `(state, frozen, batch) → (state, metrics)` with explicit in/out shardings
  on a `(data, fsdp)` mesh; the state is donated; gradient accumulation is a `lax.scan` over micro-batches;
* bf16 compute (`config.train.dtype`) on fp32 master weights; optional `nn.remat` of every U-Net block;
* non-finite loss or gradients: that update is not applied (the state stays the last good one), the run stops
  with a message naming the step, and the last checkpoint on disk is left as it is;
* clu writers (TensorBoard + `<stage>/metrics.jsonl`): loss, E-LatentLPIPS, MSE, lr, grad norm, img/s, step time;
  held-out metrics every `eval_every`; a teacher-vs-student sample grid (VAE-decoded PNG) every `sample_every`;
  one console line per `config.log_every_s` with the step, rate, ETA and headline metrics;
* `jobs`: periodic work handed in by the caller (the pipeline's paper-metric evaluation), `PeriodicJob`s run every
  `every` steps and at the last step — the trainer does not import the evaluator or the sampler.

Stage 2 (`stage2.py`) extends it through the hooks `stage_config`, `data_seed`, `setup_stage`,
`build_abstract_state`, `build_state_shardings`, `build_step` and `initial_state`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from d2g_jax import console, files
from d2g_jax import sharding as shd
from d2g_jax import workdir as wd
from d2g_jax.data.loader import PairsSource, make_loader
from d2g_jax.models.text import TextEncoder
from d2g_jax.models.unet import abstract_variables, load_unet
from d2g_jax.sampling import DDIMSchedule, _vae_scale_factor, pipeline_fingerprint
from d2g_jax.train import checkpoint as ckpt
from d2g_jax.train.distill import LOSS_KINDS, load_distill_loss
from d2g_jax.train.generator import Generator
from d2g_jax.train.optim import optimizer_from_config
from d2g_jax.train.state import TrainState, state_shardings
from d2g_jax.train.steps import make_train_step


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf."""


@dataclasses.dataclass(frozen=True)
class PeriodicJob:
    """Work the loop runs every `every` steps (0 = never) and at the last step: `fn(trainer, state, step)` returns
    scalars (or None), written to TensorBoard as `<name>/<key>`."""

    name: str
    every: int
    fn: Callable[[Trainer, TrainState, int], Mapping[str, Any] | None]


class Trainer:
    """Stage-1 training of a run directory (see the module docstring)."""

    stage = "stage1"
    headline = ("loss", "distill", "mse")  # metrics on the console progress line
    # Step metrics summed on the device over each logging interval (not only read at the logged step), turned into
    # scalars by `interval_scalars` (stage 2: the lazy R1 penalty, which a logged step rarely runs).
    interval_sums: tuple[str, ...] = ()

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, teacher_folder: str, pairs_dir: str,
                 pairs_expect: Mapping[str, Any] | None = None):  # fmt: skip
        """`pairs_expect`: further pair-manifest identity fields to require (the pipeline adds the prompts' hash)."""
        self.config, self.workdir, self.teacher_folder = config, workdir, teacher_folder
        self.dir = wd.stage_dir(workdir, self.stage)
        t = self.t = self.stage_config()
        self.mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
        fingerprint = pipeline_fingerprint(teacher_folder)
        self.run_extra = {"teacher_fingerprint": fingerprint}
        ckpt.check_run(workdir, config, self.run_extra)  # another run's workdir: refused before anything is built

        dtype = jnp.dtype(t.dtype)
        self.text = TextEncoder.from_pipeline(teacher_folder, dtype=dtype)
        unet, variables = load_unet(os.path.join(teacher_folder, "unet"), dtype=dtype, param_dtype=jnp.float32,
                                    remat_policy=t.remat)  # fmt: skip
        self.unet = unet
        self.gen = Generator(unet, DDIMSchedule.from_pipeline(teacher_folder), _vae_scale_factor(teacher_folder))
        # Pairs of another teacher or generated with other settings than config.pairs: refused.
        side = int(config.pairs.resolution) // self.gen.vae_scale_factor
        expect = {"teacher": fingerprint, "guidance_scale": float(config.pairs.guidance_scale),
                  "num_steps": int(config.pairs.num_steps), "latent_shape": [side, side, unet.config.in_channels],
                  **(pairs_expect or {})}  # fmt: skip
        source = PairsSource(pairs_dir, expect=expect)
        self.loss_fn, loss_vars = load_distill_loss(config, teacher_folder)

        # Data: the first N − holdout pairs train (or the first `train.max_pairs` of them: a pair-count scaling row
        # on a prefix of one larger set), the last `holdout` are held out for evaluation and samples.
        n_pairs = len(source)
        self.source, self.holdout = source, min(int(t.holdout), n_pairs // 2)
        n_train = n_pairs - self.holdout
        max_pairs = int(self.config.train.get("max_pairs", 0))  # both stages
        if max_pairs > n_train:
            raise ValueError(f"config.train.max_pairs={max_pairs}: {pairs_dir} has {n_pairs} pairs, {self.holdout} "
                             f"of them held out, so at most {n_train} train; generate a larger set "
                             "(config.pairs.num_pairs) or lower max_pairs (0 = all).")  # fmt: skip
        self.n_train = max_pairs or n_train
        self.loader = make_loader(source, global_batch_size=t.batch_size, seed=self.data_seed(),
                                  limit=self.n_train, read_threads=4, prefetch=int(t.prefetch))  # fmt: skip

        # Shardings, optimiser, frozen inputs.
        rep = shd.replicated(self.mesh)
        self.param_sh = shd.param_shardings(abstract_variables(unet)["params"], self.mesh)
        self.tx, self.lr_fn = optimizer_from_config(self.param_sh, t, int(t.num_steps), field="train")
        self.frozen = {"text": shd.replicate(self.text.params, self.mesh), "loss": shd.replicate(loss_vars, self.mesh)}
        self.frozen_sh = jax.tree.map(lambda _: rep, self.frozen)
        self.init_params = variables["params"]
        self.abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                            self.init_params)  # fmt: skip
        self.batch_sh = self._batch_shardings()

        # The stage's state and step (hooks).
        self.setup_stage()
        abstract_state = self.build_abstract_state()
        self.state_sh = self.build_state_shardings(abstract_state)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract_state, self.state_sh)  # fmt: skip
        self.step_fn = jax.jit(self.build_step(), in_shardings=(self.state_sh, self.frozen_sh, self.batch_sh),
                               out_shardings=(self.state_sh, rep), donate_argnums=(0,))  # fmt: skip
        self.mgr = ckpt.manager(os.path.join(self.dir, "checkpoints"), int(t.keep), bool(t.async_ckpt))

        # Made on first use.
        self.writer = None  # clu writer, opened by run()
        self._eval = None  # (jitted held-out metrics, batches)
        self._grid = None  # (jitted teacher/student decode, inputs)
        self._decoder = None  # the teacher's VAE decoder (module, replicated variables)
        self._sigterm = False
        self._restored: tuple[int, bool] | None = None  # (step, verified against its digest record) of the restore
        ckpt.record_run(workdir, config, self.run_extra)  # a new run's identity, once its set-up succeeded

    # --- hooks (stage 2 overrides these) ---

    def stage_config(self) -> ml_collections.ConfigDict:
        """The G training fields of this stage (stage 1: `config.train`, read by `config.train.lr_reading`)."""
        from d2g_jax.train.optim import read_lr

        return read_lr(self.config.train, self.config.train.lr_reading, "stage1")

    def data_seed(self) -> int:
        """Seed of this stage's data order."""
        return int(self.config.seed)

    def setup_stage(self) -> None:
        """Stage-specific models and optimisers, built after the common set-up (stage 1: none)."""

    def build_abstract_state(self) -> TrainState:
        return TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params, ema=self.abstract_params,
            opt_state=jax.eval_shape(self.tx.init, self.abstract_params),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        )  # fmt: skip

    def build_state_shardings(self, abstract_state: TrainState) -> TrainState:
        return state_shardings(abstract_state, self.param_sh, self.mesh)

    def build_step(self) -> Any:
        """The pure step of this stage."""
        return make_train_step(self.gen, self.text, self.loss_fn, self.t, self.tx, self.lr_fn,
                               float(self.config.loss.weight))  # fmt: skip

    def initial_state(self) -> TrainState:
        params = shd.put_global(self.init_params, self.param_sh)
        ema = shd.put_global(self.init_params, self.param_sh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
        rng = shd.put_global(np.asarray(jax.random.PRNGKey(int(self.config.seed) + 1), np.uint32), self.state_sh.rng)
        step = shd.put_global(np.int32(0), self.state_sh.step)
        return TrainState(step=step, params=params, ema=ema, opt_state=opt_state, rng=rng)

    def interval_scalars(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Scalars logged from the `interval_sums` of one logging interval (stage 1: none)."""
        return {}

    # --- batches ---

    def _batch_shardings(self) -> dict[str, Any]:
        b4 = NamedSharding(self.mesh, P(shd.MESH_AXES, None, None, None))
        b2 = NamedSharding(self.mesh, P(shd.MESH_AXES, None))
        n = len(self.text.modules)
        return {"noise": b4, "latent": b4, "ids": (b2,) * n, "masks": (b2,) * n}

    def _tokens(self, prompts) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        tok = self.text.tokenize([str(p) for p in prompts])
        return tuple(tok.ids), tuple(tok.masks)

    def global_batch(self, local: Mapping[str, Any]) -> dict[str, Any]:
        """A host-local loader batch → the global, sharded step input (prompts tokenised on the host)."""
        ids, masks = self._tokens(local["prompt"])
        host = {"noise": np.asarray(local["noise"], np.float32), "latent": np.asarray(local["latent"], np.float32),
                "ids": ids, "masks": masks}  # fmt: skip
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), host, self.batch_sh)

    def full_batch(self, pairs: Mapping[str, Any]) -> dict[str, Any]:
        """The same full batch on every host (evaluation/samples) → global sharded arrays."""
        ids, masks = self._tokens(pairs["prompt"])
        host = {"noise": pairs["noise"], "latent": pairs["latent"], "ids": ids, "masks": masks}
        return shd.put_global(host, self.batch_sh)

    # --- state ---

    def restore_or_init(self) -> TrainState:
        """The newest readable checkpoint (damaged newer ones moved aside, see `checkpoint.restore_newest_readable`),
        or the initial state; `metrics.jsonl` then drops rows past the restored step (they will be replayed)."""
        t = self.t
        directory = os.path.join(self.dir, "checkpoints")
        self.mgr.close()
        self.mgr, step, state = ckpt.restore_newest_readable(
            directory, lambda: ckpt.manager(directory, int(t.keep), bool(t.async_ckpt)),
            lambda mgr, s: ckpt.restore(mgr, s, self.abstract_state, self.loader),
        )  # fmt: skip
        self._truncate_jsonl(step or 0)
        if step is None:
            logging.info("%s: starting afresh (no checkpoint in %s)", self.stage, directory)
            return self.initial_state()
        from d2g_jax.train import integrity

        self._restored = (int(step), os.path.isfile(os.path.join(directory, str(step), integrity.RECORD)))
        logging.info("%s: resuming from step %d (%s)", self.stage, step, directory)
        return state

    # --- evaluation and samples ---

    def holdout_pairs(self, n: int) -> dict[str, Any]:
        idx = range(len(self.source) - self.holdout, len(self.source) - self.holdout + n)
        recs = [self.source[i] for i in idx]
        return {"noise": np.stack([r["noise"] for r in recs]).astype(np.float32),
                "latent": np.stack([r["latent"] for r in recs]).astype(np.float32),
                "prompt": [str(r["prompt"]) for r in recs]}  # fmt: skip

    def _eval_batches(self) -> list[dict[str, Any]]:
        n_dev = self.mesh.size
        bs = max(min(self.t.batch_size // self.t.grad_accum, self.holdout) // n_dev * n_dev, 0)
        if bs == 0:
            return []
        n = self.holdout // bs * bs
        pairs = self.holdout_pairs(n)
        return [self.full_batch({k: v[i : i + bs] for k, v in pairs.items()}) for i in range(0, n, bs)]

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Held-out E-LatentLPIPS (fixed augmentation draw), distillation loss and MSE, for G and its EMA."""
        if self._eval is None:
            from d2g_jax.losses.elatentlpips import e_latent_lpips

            lc = self.config.loss
            latent_vars = self.frozen["loss"] if lc.kind in LOSS_KINDS and LOSS_KINDS[lc.kind] else None

            def ev(params, frozen, batch, rng):
                cond = self.text.embed(frozen["text"], batch["ids"], batch["masks"])
                x0 = self.gen(params, batch["noise"], cond)
                out = {"mse": jnp.mean((x0 - batch["latent"]) ** 2),
                       "distill": jnp.mean(self.loss_fn(frozen["loss"], x0, batch["latent"], rng))}  # fmt: skip
                if latent_vars is not None:
                    out["e_latent_lpips"] = jnp.mean(e_latent_lpips(frozen["loss"], x0, batch["latent"], rng,
                                                                    preset=lc.augment, l1=False, encoder=lc.encoder,
                                                                    mode="ensemble"))  # fmt: skip
                    out["latent_lpips"] = jnp.mean(e_latent_lpips(frozen["loss"], x0, batch["latent"], None, l1=False,
                                                                  encoder=lc.encoder, mode="plain"))  # fmt: skip
                return out

            rep = shd.replicated(self.mesh)
            fn = jax.jit(ev, in_shardings=(self.param_sh, self.frozen_sh, self.batch_sh, rep), out_shardings=rep)
            self._eval = (fn, self._eval_batches())
        fn, batches = self._eval
        if not batches:
            return {}
        out: dict[str, float] = {}
        key = shd.put_global(np.asarray(jax.random.PRNGKey(12345), np.uint32), shd.replicated(self.mesh))
        for name, params in (("", state.params), ("ema_", state.ema)):
            acc: dict[str, float] = {}
            for b in batches:
                for k, v in jax.device_get(fn(params, self.frozen, b, key)).items():
                    acc[k] = acc.get(k, 0.0) + float(v) / len(batches)
            out.update({f"eval/{name}{k}": v for k, v in acc.items()})
        self._jsonl({"step": int(jax.device_get(state.step)), **out})
        return out

    def vae_decoder(self) -> tuple[Any, Any]:
        """The teacher's VAE decoder `(module, replicated variables)`, loaded once (sample grids, evaluation)."""
        if self._decoder is None:
            from d2g_jax.models.vae import load_vae

            mod, variables = load_vae(self.teacher_folder, parts=("decoder",))
            self._decoder = (mod, shd.replicate(variables, self.mesh))
        return self._decoder

    def sample_grid(self, state: TrainState, step: int) -> str | None:
        """Teacher (its ODE, from the pairs) over student (one step, EMA) on fixed held-out noises/prompts."""
        n = min(int(self.t.num_samples), self.holdout)
        if n == 0:
            return None
        if self._grid is None:
            mod, vae_vars = self.vae_decoder()
            pairs = self.holdout_pairs(n)
            ids, masks = self._tokens(pairs["prompt"])
            inputs = shd.replicate({"noise": pairs["noise"], "latent": pairs["latent"], "ids": ids, "masks": masks},
                                   self.mesh)  # fmt: skip

            def teacher_and_student(params, frozen, vae_vars, b):
                cond = self.text.embed(frozen["text"], b["ids"], b["masks"])
                x0 = self.gen(params, b["noise"], cond)
                dec = lambda z: mod.apply(vae_vars, z, method="decode_latents")
                return dec(b["latent"]), dec(x0)

            self._grid = (jax.jit(teacher_and_student, out_shardings=shd.replicated(self.mesh)), inputs)
        fn, inputs = self._grid
        teacher_img, student_img = jax.device_get(fn(state.ema, self.frozen, self.vae_decoder()[1], inputs))
        grid = files.image_grid([files.to_uint8(teacher_img), files.to_uint8(student_img)], columns=n)
        path = None
        if jax.process_index() == 0:
            os.makedirs(os.path.join(self.dir, "samples"), exist_ok=True)
            path = files.write_png(os.path.join(self.dir, "samples", f"step_{step:08d}.png"), grid)
        self.writer.write_images(step, {"samples/teacher_top_student_bottom": grid[None]})
        return path

    # --- the loop ---

    def run(self, jobs: Sequence[PeriodicJob] = ()) -> TrainState:
        """Trains from the latest checkpoint to `num_steps` (or `stop_after`, or a preemption signal)."""
        from clu import metric_writers

        t = self.t
        num_steps = int(t.num_steps)
        os.makedirs(self.dir, exist_ok=True)
        if self.writer is None:
            self.writer = metric_writers.create_default_writer(
                os.path.join(self.dir, "tb"), just_logging=jax.process_index() > 0, asynchronous=False
            )
        state = self.restore_or_init()
        self._install_sigterm()
        start = int(jax.device_get(state.step))
        if start >= num_steps:
            logging.info("%s: already at step %d of %d", self.stage, start, num_steps)
            self.mgr.wait_until_finished()
            return state
        if start == 0:
            if int(t.eval_every) > 0:
                self.writer.write_scalars(0, self.evaluate(state))
            if int(t.sample_every) > 0:
                self.sample_grid(state, 0)
        progress = console.Progress(self.stage, num_steps, start, every_s=float(self.config.log_every_s))
        last_ckpt = start
        pending = None  # (step, metrics) whose `finite` flag has not been read yet
        t_log, steps_since = time.perf_counter(), 0
        shown: dict[str, float] = {}
        sums = None  # `interval_sums` over the current logging interval (device arrays: no sync per step)
        step = start
        while step < num_steps:
            batch = self.global_batch(next(self.loader))
            state, metrics = self.step_fn(state, self.frozen, batch)
            step += 1
            if self.interval_sums:
                part = {k: metrics[k] for k in self.interval_sums}
                sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
            self._check_saves(step, last_ckpt)
            steps_since += 1
            if pending is not None:
                self._check_finite(*pending, last_ckpt)
            pending = (step, metrics)
            if step % int(t.log_every) == 0 or step == num_steps:
                m = jax.device_get(metrics)
                self._check_finite(step, m, last_ckpt)
                dt = (time.perf_counter() - t_log) / steps_since
                scalars = {k: float(v) for k, v in m.items() if k != "finite"}
                interval = self.interval_scalars({k: float(v) for k, v in jax.device_get(sums).items()}) if sums else {}
                sums = None
                scalars.update({"step_time_s": dt, "img_per_s": t.batch_size / dt, **interval})
                self.writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                self._jsonl({"step": step, **{k: float(v) for k, v in m.items() if k != "finite"}, **interval})
                shown = scalars
                t_log, steps_since = time.perf_counter(), 0
            progress(step, shown, self.headline + ("img_per_s",))
            stop = int(t.stop_after) > 0 and step - start >= int(t.stop_after)
            if self._preempted(step):
                logging.warning("%s: preemption signal: checkpointing step %d and exiting.", self.stage, step)
                stop = True
            if _due(step, t.eval_every, num_steps):
                self.writer.write_scalars(step, self.evaluate(state))
            if _due(step, t.sample_every, num_steps):
                self.sample_grid(state, step)
            for job in jobs:
                if _due(step, job.every, num_steps):
                    out = job.fn(self, state, step) or {}
                    scalars = {f"{job.name}/{k}": float(v) for k, v in out.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
                    if scalars:
                        self.writer.write_scalars(step, scalars)
            if _due(step, t.ckpt_every, num_steps) or stop:
                self._check_finite(*pending, last_ckpt)
                pending = None
                try:
                    ckpt.save(self.mgr, step, state, self.loader)
                except Exception as e:  # noqa: BLE001 - any save failure (full disk, permissions) stops the run here
                    raise self._save_error(step, last_ckpt, e) from e
                last_ckpt = step
            if stop:
                logging.warning("%s: stopping after %d steps of this process (config.train.stop_after) at step %d; "
                                "rerun the same command to resume.", self.stage, int(t.stop_after), step)  # fmt: skip
                break
        try:
            self.mgr.wait_until_finished()
            ckpt.check_saves(self.mgr)
        except Exception as e:  # noqa: BLE001 - the last save failed in the background
            raise self._save_error(last_ckpt, None, e) from e
        self.writer.flush()
        return state

    def _check_saves(self, step: int, last_ckpt: int) -> None:
        try:
            ckpt.check_saves(self.mgr)
        except Exception as e:  # noqa: BLE001 - an asynchronous save failed: stop at this step
            raise self._save_error(last_ckpt, None, e, at=step) from e

    def _save_error(self, step: int, last_good: int | None, e: BaseException, at: int | None = None):
        where = os.path.join(self.dir, "checkpoints")
        stop = f"training stopped at step {at if at is not None else step}"
        prev = "" if last_good is None else f" (the last complete checkpoint is step {last_good})"
        return ckpt.CheckpointError(f"{self.stage}: saving checkpoint step {step} in {where} failed; {stop}{prev}. "
                                    f"Cause: {type(e).__name__}: {e}")  # fmt: skip

    def _install_sigterm(self) -> None:
        """SIGTERM (SLURM requeue/timeout, k8s eviction) → checkpoint at the next step, then exit."""
        import signal
        import threading

        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():

            def handler(signum, frame):
                self._sigterm = True

            signal.signal(signal.SIGTERM, handler)

    def _preempted(self, step: int) -> bool:
        if jax.process_count() > 1:  # all hosts agree on the step (JAX's preemption sync service)
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._sigterm

    def _jsonl(self, record: Mapping[str, Any]) -> None:
        """Appends one line to `<stage>/metrics.jsonl` (process 0): the exact per-step training metrics."""
        if jax.process_index() == 0:
            os.makedirs(self.dir, exist_ok=True)
            with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_jsonl(self, step: int) -> None:
        """Drops `metrics.jsonl` rows past `step` (process 0): a resumed run replays them, so each step appears once."""
        path = os.path.join(self.dir, "metrics.jsonl")
        if jax.process_index() != 0 or not os.path.isfile(path):
            return
        with open(path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if ln.strip() and int(json.loads(ln).get("step", 0)) <= step]
        if len(keep) != len(lines):
            files.atomic_write_text(path, "".join(keep))

    def _check_finite(self, step: int, metrics: Mapping[str, Any], last_ckpt: int) -> None:
        if bool(jax.device_get(metrics["finite"])):
            return
        self.mgr.wait_until_finished()
        loss, gn = float(jax.device_get(metrics["loss"])), float(jax.device_get(metrics["grad_norm"]))
        section = "stage2" if self.stage == "stage2" else "train"
        lr = float(self.t.lr)
        fix = f"--config.{section}.lr={lr / 10:g} --config.resume_changes={section}.lr"
        clip = "--config.train.grad_clip=1.0 --config.resume_changes=train.grad_clip"
        where = os.path.join(self.dir, "checkpoints")
        restored, verified = self._restored or (None, False)
        last = f"The last good checkpoint is step {last_ckpt}"
        damaged = ""
        if restored is not None and step - restored <= NAN_AFTER_RESUME_STEPS:
            if verified:
                damaged = (f"This came {step - restored} step(s) after resuming from step {restored}, whose files "
                           "matched their digest record (its bytes are as written): not a damaged checkpoint. ")
            else:  # no digest record: its bytes could not be checked
                last = f"The last checkpoint is step {last_ckpt}"
                damaged = (
                    f"This came {step - restored} step(s) after resuming from step {restored}, which has no digest "
                    "record and was restored unverified: that checkpoint may be damaged (bytes changed by a disk, a "
                    "copy or a sync). Check the workdir first:\n  "
                    f"{console.command('--config.mode=verify')}\nand if step {restored} was copied or its disk is "
                    f"suspect, move {os.path.join(where, str(restored))} aside and rerun the same command to continue "
                    "from the step before it. Only then: "
                )  # fmt: skip
        raise NonFiniteError(
            f"{self.stage}: non-finite loss/gradients at step {step} (loss={loss}, grad_norm={gn}); the update was "
            f"not applied and training stopped. {damaged}{last} in {where} (left untouched). To continue from it "
            f"with a lower learning rate, rerun the same command with {fix}\n  {console.command(fix)}\nor with "
            f"gradient clipping: {clip}. Otherwise check the pairs (--config.mode=verify checks every record)."
        )


NAN_AFTER_RESUME_STEPS = 10  # a non-finite step this soon after a restore names the restored checkpoint first


def _due(step: int, every: int, last: int) -> bool:
    """Periodic actions: every `every` steps and at the last step; `every <= 0` disables them."""
    every = int(every)
    return every > 0 and (step % every == 0 or step == last)
