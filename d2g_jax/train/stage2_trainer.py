"""`Stage2Trainer`: the stage-1 `Trainer` with D and its optimiser added to the state (the step is
`stage2.make_stage2_step`). It starts from the last stage-1 checkpoint (G and its EMA; fresh Adam for both G and D;
D from the teacher) and resumes from its own checkpoints in `<workdir>/stage2/`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from d2g_jax import sharding as shd
from d2g_jax.train.discriminator import Discriminator, abstract_disc_variables, init_disc_params
from d2g_jax.train.optim import optimizer_from_config, read_lr
from d2g_jax.train.stage2 import make_stage2_step, stage2_train_config
from d2g_jax.train.state import TrainState, state_shardings
from d2g_jax.train.trainer import Trainer


class Stage2Trainer(Trainer):
    """Stage 2 of a run directory: `<workdir>/stage2/` (checkpoints hold G, EMA, D and both optimisers)."""

    stage = "stage2"
    headline = ("loss", "distill", "gan_g", "d_loss", "d_real", "d_fake", "d_acc")
    interval_sums = ("r1", "r1_applied")

    def interval_scalars(self, sums):
        """`r1_mean`: the mean R1 penalty ‖∇D‖² over the R1 steps of the logging interval (0 when none ran);
        `r1_steps`: how many ran."""
        n = sums["r1_applied"]
        return {"r1_mean": sums["r1"] / n if n else 0.0, "r1_steps": n}

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Stage 1's held-out G metrics, plus D on the same held-out pairs (never trained on): its per-image
        accuracy real vs G's fakes (`eval/d_acc`, `d_acc_real`, `d_acc_fake`) and every read-out map's mean
        real/fake logit (`eval/d_map{i}_real|fake`; map 0 = the ε-map unless config.disc.eps_map="off")."""
        out = super().evaluate(state)
        if self._d_eval is None:
            from d2g_jax.train.stage2 import make_d_eval

            rep = shd.replicated(self.mesh)
            fn = jax.jit(make_d_eval(self.gen, self.disc, self.text, self.config.disc),
                         in_shardings=(self.param_sh, self.disc_sh, self.frozen_sh, self.batch_sh, rep),
                         out_shardings=rep)  # fmt: skip
            self._d_eval = (fn, self._eval[1] if self._eval else self._eval_batches())
        fn, batches = self._d_eval
        if not batches:
            return out
        key = shd.put_global(np.asarray(jax.random.PRNGKey(777), np.uint32), shd.replicated(self.mesh))
        acc: dict[str, float] = {}
        for b in batches:
            for k, v in jax.device_get(fn(state.params, state.disc, self.frozen, b, key)).items():
                acc[k] = acc.get(k, 0.0) + float(v) / len(batches)
        d = {f"eval/d_{k}": v for k, v in acc.items()}
        self._jsonl({"step": int(jax.device_get(state.step)), **d})
        return {**out, **d}

    def stage_config(self) -> ml_collections.ConfigDict:
        return read_lr(stage2_train_config(self.config), self.config.train.lr_reading, "stage2")

    def data_seed(self) -> int:
        return int(self.config.seed) + 1  # another order than stage 1's

    def setup_stage(self) -> None:
        """D (the teacher U-Net made multi-scale and z-conditional), its shardings and its optimiser."""
        from d2g_jax.models.unet import UNet2DConditionModel

        dc = self.config.disc
        dunet = UNet2DConditionModel(self.unet.config, dtype=self.unet.dtype, param_dtype=jnp.float32,
                                     remat_policy=dc.remat or self.t.remat)  # fmt: skip
        self.disc = Discriminator(dunet, z_cond=bool(dc.z_cond), multiscale_in=bool(dc.multiscale_in),
                                  multiscale_out=bool(dc.multiscale_out))  # fmt: skip
        boxed = abstract_disc_variables(self.disc)["params"]
        self.disc_sh = shd.param_shardings(boxed, self.mesh)
        self.abstract_disc = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(boxed))
        self.dtx, self.dlr_fn = optimizer_from_config(self.disc_sh, dc, int(self.t.num_steps), field="disc")
        self._d_eval = None  # (jitted held-out D read-out, batches), made on first use

    def build_abstract_state(self) -> TrainState:
        return (
            super()
            .build_abstract_state()
            .replace(disc=self.abstract_disc, disc_opt=jax.eval_shape(self.dtx.init, self.abstract_disc))
        )

    def build_state_shardings(self, abstract_state: TrainState) -> TrainState:
        return state_shardings(abstract_state, self.param_sh, self.mesh, self.disc_sh)

    def build_step(self):
        return make_stage2_step(self.gen, self.disc, self.text, self.loss_fn, self.t, self.config.disc, self.tx,
                                self.lr_fn, self.dtx, self.dlr_fn, distill_weight=float(self.config.loss.weight),
                                gan_weight=float(self.config.stage2.gan_weight), update=self.config.stage2.update_order,
                                data_groups=int(self.mesh.devices.size),
                                log_grad_parts=bool(self.config.stage2.log_grad_parts))  # fmt: skip

    # --- the stage switch ---

    def stage1_source(self) -> tuple[str, int]:
        """`(stage-1 checkpoint dir, step)` to start from: this workdir's finished stage 1, or
        `config.stage2.init_from` (another run's workdir with the same teacher)."""
        from d2g_jax.train import checkpoint as ckpt

        init_from = self.config.stage2.init_from
        wd = init_from or self.workdir
        directory = os.path.join(wd, "stage1", "checkpoints")
        mgr = ckpt.manager(directory, 1, False) if os.path.isdir(directory) else None
        step = mgr.latest_step() if mgr is not None else None
        if step is None:
            where = f"config.stage2.init_from={init_from}" if init_from else "this workdir"
            raise FileNotFoundError(f"{directory}: no stage-1 checkpoint to start stage 2 from ({where}); run stage 1 "
                                    "first (--config.mode=train) or point config.stage2.init_from at a workdir "
                                    "that has one.")  # fmt: skip
        if init_from:
            run_file = os.path.join(init_from, ckpt.RUN_FILE)
            mine = json.load(open(os.path.join(self.workdir, ckpt.RUN_FILE))).get("teacher_fingerprint")
            theirs = json.load(open(run_file)).get("teacher_fingerprint") if os.path.isfile(run_file) else None
            if theirs != mine:
                raise ckpt.RunMismatchError(f"config.stage2.init_from={init_from}: its run.json does not record this "
                                            "teacher (fingerprints differ or run.json is missing); stage 2 must start "
                                            "from a generator distilled from the same teacher.")  # fmt: skip
        elif step < int(self.config.train.num_steps):
            raise RuntimeError(f"{directory}: stage 1 is at step {step} of config.train.num_steps="
                               f"{self.config.train.num_steps}; finish stage 1 before stage 2.")  # fmt: skip
        return directory, int(step)

    def _restore_stage1(self) -> tuple[Any, Any, int]:
        """(params, ema) of the stage-1 checkpoint, sharded like this stage's G, and its step."""
        import orbax.checkpoint as ocp

        from d2g_jax.train import checkpoint as ckpt

        directory, step = self.stage1_source()
        tx1, _ = optimizer_from_config(self.param_sh, self.config.train, int(self.config.train.num_steps))
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                              ema=self.abstract_params, opt_state=jax.eval_shape(tx1.init, self.abstract_params),
                              rng=jax.ShapeDtypeStruct((2,), jnp.uint32))  # fmt: skip
        sh = state_shardings(abstract, self.param_sh, self.mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        restore = lambda mgr, s: mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        _, step, restored = ckpt.restore_newest_readable(directory, lambda: ckpt.manager(directory, 1, False),
                                                         lambda mgr, s: restore(mgr, s)["state"])  # fmt: skip
        if step is None:
            raise FileNotFoundError(f"{directory}: no stage-1 checkpoint to start stage 2 from.")
        return restored.params, restored.ema, step

    def initial_state(self) -> TrainState:
        params, ema, s1 = self._restore_stage1()
        logging.info("stage2: G and EMA from stage-1 step %d; D from the teacher U-Net", s1)
        if self.config.stage2.ema_restart:  # the EMA restarts from the weights stage 2 starts from (its own buffers)
            ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.state_sh.ema)(params)
            logging.info("stage2: EMA restarted from G's weights (config.stage2.ema_restart; start step %d)",
                         int(self.config.stage2.ema_start))  # fmt: skip
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
        disc = shd.put_global(init_disc_params(self.disc, self.init_params, int(self.config.seed)), self.disc_sh)
        disc_opt = jax.jit(self.dtx.init, out_shardings=self.state_sh.disc_opt)(disc)
        rng = shd.put_global(np.asarray(jax.random.PRNGKey(int(self.config.seed) + 2), np.uint32), self.state_sh.rng)
        step = shd.put_global(np.int32(0), self.state_sh.step)
        return TrainState(step=step, params=params, ema=ema, opt_state=opt_state, rng=rng, disc=disc,
                          disc_opt=disc_opt)  # fmt: skip
