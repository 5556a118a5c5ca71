"""Stage 2 of Diffusion2GAN (paper §3.3, Appendix A.1 "Two-stage training", Table A1 "second stage"):
fine-tune the stage-1 generator with

    L_G = λ_distil · E-LatentLPIPS(G(z, c), x0) + λ_GAN · softplus(−D(c, z, G(z, c)))
    L_D = softplus(−D(c, z, x0)) + softplus(D(c', z', x̃))
          [+ (γ/2) · interval · ‖∇ D(c, z, x0)‖² every interval steps]

against the multi-scale conditional diffusion discriminator of `discriminator.py`, where (c', z', x̃) is the
generated batch after mix-and-match. One D update per G update, both in one jitted step: G's forward is taken
once; its output (detached) is D's fake batch (real and fake rows go through D in one call); G's GAN gradient uses
D before this step's D update (simultaneous updates). R1 is lazy: on steps `step % r1_interval == 0` (a
`lax.cond`, one compile) on the first `r1_samples` real examples (1: the paper's single-sample R1), its gradient
added to D's with γ scaled by the interval. With noise augmentation (SDXL recipe) real and fake latents of a row
are noised at the same random timestep with the same noise before D; otherwise D sees clean latents at
`disc.timestep`.

`Stage2Trainer` is the stage-1 `Trainer` with D and its optimiser added to the state; it starts from the last
stage-1 checkpoint (G and its EMA; fresh Adam for both G and D; D from the teacher) and resumes from its own.
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
from d2g_jax.models.blocks import attention_implementation
from d2g_jax.train.discriminator import (
    Discriminator,
    abstract_disc_variables,
    init_disc_params,
    mean_logit,
    mix_and_match,
    mix_and_match_rows,
    ns_d_loss,
    ns_g_loss,
    r1_penalty,
    r1_score,
)
from d2g_jax.train.optim import optimizer_from_config
from d2g_jax.train.state import TrainState, state_shardings
from d2g_jax.train.steps import global_norm, guarded_update
from d2g_jax.train.trainer import Trainer


def stage2_overrides(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The fields of `config.stage2` that replace `config.train`'s for G in stage 2: every field the two sections
    share (num_steps, batch_size, lr, lr_end, ema_start and the logging/checkpoint cadence in configs/base.py)."""
    return tuple(k for k in config.stage2.keys() if k in config.train.keys())


def stage2_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.train` with the stage-2 values of `stage2_overrides`."""
    t = config.train.copy_and_resolve_references()
    with t.unlocked():
        for k in stage2_overrides(config):
            t[k] = config.stage2[k]
    return t


def check_disc_config(dc: ml_collections.ConfigDict, num_train_timesteps: int = 1000, batch: int | None = None) -> None:
    """The cross-field rules of `config.disc` (run by `d2g_jax.validate` before any phase, and by the step);
    with `batch`, also the mix-and-match row plan of D's fake batch of that size."""
    if batch is not None:
        mix_and_match_rows(int(batch), float(dc.mix_match_fraction), mix_match_types(dc))
    gamma, interval, n_r1 = float(dc.r1_gamma), int(dc.r1_interval), int(dc.r1_samples)
    if gamma < 0:
        raise ValueError(f"config.disc.r1_gamma={dc.r1_gamma} must be ≥ 0 (0 = no R1).")
    if gamma > 0 and (interval < 1 or n_r1 < 1):
        raise ValueError(f"config.disc.r1_interval={interval} and config.disc.r1_samples={n_r1} must be ≥ 1 when "
                         "r1_gamma > 0.")  # fmt: skip
    t_lo, t_hi = int(dc.noise_aug_t_min), int(dc.noise_aug_t_max)
    if dc.noise_aug and not 0 <= t_lo <= t_hi < num_train_timesteps:
        raise ValueError(f"config.disc.noise_aug_t_min/max = {t_lo}/{t_hi}: need 0 ≤ min ≤ max < "
                         f"{num_train_timesteps}.")  # fmt: skip
    if not dc.noise_aug and not 0 <= int(dc.timestep) < num_train_timesteps:
        raise ValueError(f"config.disc.timestep={dc.timestep}: need 0 ≤ t < {num_train_timesteps}.")


def mix_match_types(dc: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(s.strip() for s in str(dc.mix_match_types).split(",") if s.strip())


def make_stage2_step(gen, disc: Discriminator, text, loss_fn, t, dc, tx, lr_fn, dtx, dlr_fn, *, distill_weight: float,
                     gan_weight: float):  # fmt: skip
    """The pure stage-2 step `(state, frozen, batch) → (state, metrics)` (see the module docstring)."""
    ac = np.asarray(gen.schedule.alphas_cumprod, np.float32)
    check_disc_config(dc, len(ac))
    types = mix_match_types(dc)
    plan = mix_and_match_rows(int(t.batch_size), float(dc.mix_match_fraction), types)
    gamma, interval, n_r1 = float(dc.r1_gamma), int(dc.r1_interval), int(dc.r1_samples)
    t_lo, t_hi = int(dc.noise_aug_t_min), int(dc.noise_aug_t_max)

    def d_apply(dparams, x, z, td, cond):
        b, h, w = x.shape[:3]
        added = gen.added_conditions(cond, b, h, w)
        return disc.apply({"params": dparams}, x, z, td, cond["context"], **added)

    def augment(x, td, eps):
        if not dc.noise_aug:
            return x
        a = jnp.sqrt(jnp.asarray(ac)[td]).reshape(-1, 1, 1, 1)
        s = jnp.sqrt(1.0 - jnp.asarray(ac)[td]).reshape(-1, 1, 1, 1)
        return a * x + s * eps

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        k_loss, k_t, k_eps = jax.random.split(rng, 3)
        z, real = batch["noise"], batch["latent"]
        b = z.shape[0]
        cond = jax.lax.stop_gradient(text.embed(frozen["text"], batch["ids"], batch["masks"]))
        if dc.noise_aug:
            td = jax.random.randint(k_t, (b,), t_lo, t_hi + 1)
            eps = jax.random.normal(k_eps, real.shape, jnp.float32)
        else:
            td, eps = jnp.full((b,), int(dc.timestep), jnp.int32), None

        def g_objective(params):
            x0 = gen(params, z, cond)
            d = jnp.mean(loss_fn(frozen["loss"], x0, real, k_loss).astype(jnp.float32))
            gan = ns_g_loss(d_apply(state.disc, augment(x0, td, eps), z, td, cond))
            aux = {"distill": d, "gan_g": gan, "mse": jnp.mean((x0 - real) ** 2)}
            return distill_weight * d + gan_weight * gan, (x0, aux)

        (loss, (x0, aux)), grads = jax.value_and_grad(g_objective, has_aux=True)(state.params)
        xf, zf, cf = mix_and_match(plan, types, jax.lax.stop_gradient(x0), real, z, cond)
        x_real = augment(real, td, eps)

        # Real and fake rows in one D call of 2B rows, interleaved (row 2i real, 2i + 1 fake): each device keeps its
        # own rows, so no data moves between devices, and D's graph is traced once.
        both = lambda a, b_: None if a is None else jnp.stack([a, b_], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
        d_in = (both(x_real, augment(xf, td, eps)), both(z, zf), both(td, td),
                {k: both(v, cf[k]) for k, v in cond.items()})  # fmt: skip

        def d_objective(dparams):
            maps = d_apply(dparams, *d_in)
            split = [m.reshape(b, 2, *m.shape[1:]) for m in maps]
            lr_, lf = [m[:, 0] for m in split], [m[:, 1] for m in split]
            return ns_d_loss(lr_, lf), {"d_real": mean_logit(lr_), "d_fake": mean_logit(lf)}

        (d_loss, d_aux), d_grads = jax.value_and_grad(d_objective, has_aux=True)(state.disc)
        r1 = jnp.float32(0.0)
        due = jnp.asarray(False)
        if gamma > 0:
            sub = lambda a: None if a is None else a[:n_r1]
            c1 = {k: sub(v) for k, v in cond.items()}

            def r1_objective(dparams):
                with attention_implementation("xla"):  # second derivatives: no cuDNN flash kernel here
                    pen = r1_penalty(lambda v: r1_score(d_apply(dparams, v, z[:n_r1], td[:n_r1], c1)), x_real[:n_r1])
                return 0.5 * gamma * interval * pen, pen

            due = state.step % interval == 0
            (_, r1), r1_grads = jax.lax.cond(
                due,
                lambda p: jax.value_and_grad(r1_objective, has_aux=True)(p),
                lambda p: ((jnp.float32(0.0), jnp.float32(0.0)), jax.tree.map(jnp.zeros_like, p)),
                state.disc,
            )
            d_grads = jax.tree.map(jnp.add, d_grads, r1_grads)

        gnorm, dnorm = global_norm(grads), global_norm(d_grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(d_loss) & jnp.isfinite(dnorm)
        new = guarded_update(state, finite, t, tx=tx, grads=grads, dtx=dtx, d_grads=d_grads)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": lr_fn(state.step), "finite": finite, **aux,
                   "d_loss": d_loss, "d_grad_norm": dnorm, "d_lr": dlr_fn(state.step), **d_aux,
                   "r1": r1, "r1_applied": due.astype(jnp.float32)}  # fmt: skip
        return new, metrics

    return step


class Stage2Trainer(Trainer):
    """Stage 2 of a run directory: `<workdir>/stage2/` (checkpoints hold G, EMA, D and both optimisers)."""

    stage = "stage2"
    headline = ("loss", "distill", "gan_g", "d_loss", "d_real", "d_fake")

    def stage_config(self) -> ml_collections.ConfigDict:
        return stage2_train_config(self.config)

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

    def build_abstract_state(self) -> TrainState:
        return super().build_abstract_state().replace(
            disc=self.abstract_disc, disc_opt=jax.eval_shape(self.dtx.init, self.abstract_disc)
        )

    def build_state_shardings(self, abstract_state: TrainState) -> TrainState:
        return state_shardings(abstract_state, self.param_sh, self.mesh, self.disc_sh)

    def build_step(self):
        return make_stage2_step(self.gen, self.disc, self.text, self.loss_fn, self.t, self.config.disc, self.tx,
                                self.lr_fn, self.dtx, self.dlr_fn, distill_weight=float(self.config.loss.weight),
                                gan_weight=float(self.config.stage2.gan_weight))  # fmt: skip

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
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
        disc = shd.put_global(init_disc_params(self.disc, self.init_params, int(self.config.seed)), self.disc_sh)
        disc_opt = jax.jit(self.dtx.init, out_shardings=self.state_sh.disc_opt)(disc)
        rng = shd.put_global(np.asarray(jax.random.PRNGKey(int(self.config.seed) + 2), np.uint32), self.state_sh.rng)
        step = shd.put_global(np.int32(0), self.state_sh.step)
        return TrainState(step=step, params=params, ema=ema, opt_state=opt_state, rng=rng, disc=disc,
                          disc_opt=disc_opt)  # fmt: skip
