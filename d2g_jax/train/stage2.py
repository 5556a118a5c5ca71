"""Stage 2 of Diffusion2GAN (paper §3.3, Appendix A.1 "Two-stage training", Table A1 "second stage"):
fine-tune the stage-1 generator with

    L_G = λ_distil · E-LatentLPIPS(G(z, c), x0) + λ_GAN · softplus(−D(c, z, G(z, c)))
    L_D = softplus(−D(c, z, x0)) + softplus(D(c', z', x̃))
          [+ (γ/2) · interval · ‖∇ D(c, z, x0)‖² every interval steps]

against the multi-scale conditional diffusion discriminator of `discriminator.py`, where (c', z', x̃) is the
generated batch after mix-and-match. One D update per G update, both in one jitted step (`stage2.update_order`):
"simultaneous": G's forward is taken once; its output (detached) is D's fake batch; G's GAN gradient uses D before
this step's D update. "alternating": G is updated first, then D sees the *updated* G's output (a second G forward,
Table A1's 5 U-Net passes per sample). Real and fake rows go through D in one call. R1 is lazy: on steps
`step % r1_interval == 0` (a `lax.cond`, one compile) on `r1_samples` real examples of the batch
(`disc.r1_scope="batch"`: the first ones; 1 = the paper's single-sample R1) or of each device's slice
(`"device"`: the first ones of each of `disc.r1_groups` slices), its gradient added to D's with γ scaled by the
interval. With noise augmentation (SDXL recipe) real and fake latents of a row
are noised at the same random timestep with the same noise before D; otherwise D sees clean latents at
`disc.timestep`.

This module is the pure step and its config rules (no data, checkpoint or loop imports: `bench/` and `validate`
import it alone); `stage2_trainer.Stage2Trainer` runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2g_jax.models.blocks import attention_implementation
from d2g_jax.train.discriminator import (
    EPS_MAPS,
    R1_REDUCES,
    Discriminator,
    image_scores,
    mean_logit,
    mix_and_match,
    mix_and_match_rows,
    ns_d_loss,
    ns_g_loss,
    r1_penalty,
    r1_score,
    readout_maps,
)
from d2g_jax.train.state import TrainState
from d2g_jax.train.steps import global_norm, guarded_update


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


UPDATES = ("simultaneous", "alternating")
R1_SCOPES = ("batch", "device")


def r1_rows(batch: int, n_r1: int, scope: str, groups: int) -> np.ndarray:
    """Rows of the real batch R1 is taken on: the first `n_r1` of the batch (`scope="batch"`), or the first `n_r1`
    of each of `groups` equal slices (`"device"`: the batch is split over devices in that order)."""
    if scope not in R1_SCOPES:
        raise ValueError(f"config.disc.r1_scope={scope!r}: choose one of {R1_SCOPES}.")
    groups = 1 if scope == "batch" else int(groups)
    if groups < 1 or batch % groups:
        raise ValueError(f"config.disc.r1_groups={groups}: the batch of {batch} must split into that many equal "
                         "slices (0 = one per device).")  # fmt: skip
    per = batch // groups
    if n_r1 > per:
        raise ValueError(f"config.disc.r1_samples={n_r1} exceeds the {per} rows of each of the {groups} "
                         f"{'batch' if groups == 1 else 'slices'} (config.disc.r1_scope={scope!r}).")  # fmt: skip
    return (np.arange(groups)[:, None] * per + np.arange(n_r1)[None, :]).reshape(-1)


def check_disc_config(dc: ml_collections.ConfigDict, num_train_timesteps: int = 1000, batch: int | None = None,
                      data_groups: int = 1) -> None:  # fmt: skip
    """The cross-field rules of `config.disc` (run by `d2g_jax.validate` before any phase, and by the step);
    with `batch`, also the mix-and-match row plan of D's fake batch of that size and the R1 rows."""
    if dc.r1_scope not in R1_SCOPES:
        raise ValueError(f"config.disc.r1_scope={dc.r1_scope!r}: choose one of {R1_SCOPES}.")
    if int(dc.r1_groups) < 0:
        raise ValueError(f"config.disc.r1_groups={dc.r1_groups} must be ≥ 0 (0 = one slice per device).")
    if batch is not None:
        mix_and_match_rows(int(batch), float(dc.mix_match_fraction), mix_match_types(dc))
        if float(dc.r1_gamma) > 0 and int(dc.r1_samples) >= 1:
            r1_rows(int(batch), int(dc.r1_samples), dc.r1_scope, int(dc.r1_groups) or data_groups)
    gamma, interval, n_r1 = float(dc.r1_gamma), int(dc.r1_interval), int(dc.r1_samples)
    if gamma < 0:
        raise ValueError(f"config.disc.r1_gamma={dc.r1_gamma} must be ≥ 0 (0 = no R1).")
    if gamma > 0 and (interval < 1 or n_r1 < 1):
        raise ValueError(f"config.disc.r1_interval={interval} and config.disc.r1_samples={n_r1} must be ≥ 1 when "
                         "r1_gamma > 0.")  # fmt: skip
    if dc.r1_reduce not in R1_REDUCES:
        raise ValueError(f"config.disc.r1_reduce={dc.r1_reduce!r}: choose one of {R1_REDUCES}.")
    if gamma > 0 and not 0 <= int(dc.r1_offset) < interval:
        raise ValueError(f"config.disc.r1_offset={dc.r1_offset}: need 0 ≤ offset < config.disc.r1_interval="
                         f"{interval} (R1 runs on the steps where step % interval == offset).")  # fmt: skip
    if dc.eps_map not in EPS_MAPS:
        raise ValueError(f"config.disc.eps_map={dc.eps_map!r}: choose one of {EPS_MAPS}.")
    if dc.eps_map == "off" and not dc.multiscale_out:
        raise ValueError("config.disc.eps_map='off' needs config.disc.multiscale_out=True (D would have no read-out).")
    t_lo, t_hi = int(dc.noise_aug_t_min), int(dc.noise_aug_t_max)
    if dc.noise_aug and not 0 <= t_lo <= t_hi < num_train_timesteps:
        raise ValueError(f"config.disc.noise_aug_t_min/max = {t_lo}/{t_hi}: need 0 ≤ min ≤ max < "
                         f"{num_train_timesteps}.")  # fmt: skip
    if not dc.noise_aug and not 0 <= int(dc.timestep) < num_train_timesteps:
        raise ValueError(f"config.disc.timestep={dc.timestep}: need 0 ≤ t < {num_train_timesteps}.")


def mix_match_types(dc: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(s.strip() for s in str(dc.mix_match_types).split(",") if s.strip())


def make_stage2_step(gen, disc: Discriminator, text, loss_fn, t, dc, tx, lr_fn, dtx, dlr_fn, *, distill_weight: float,
                     gan_weight: float, update: str = "simultaneous", data_groups: int = 1,
                     log_grad_parts: bool = True):  # fmt: skip
    """The pure stage-2 step `(state, frozen, batch) → (state, metrics)` (see the module docstring).
    `update`: config.stage2.update_order; `data_groups`: the devices the batch is split over (R1 per device);
    `log_grad_parts` (config.stage2.log_grad_parts): G's distillation and GAN gradients pulled back through G
    separately and their norms logged (one more G backward per step), else their sum pulled back once."""
    if update not in UPDATES:
        raise ValueError(f"config.stage2.update_order={update!r}: choose one of {UPDATES}.")
    ac = np.asarray(gen.schedule.alphas_cumprod, np.float32)
    check_disc_config(dc, len(ac))
    types = mix_match_types(dc)
    plan = mix_and_match_rows(int(t.batch_size), float(dc.mix_match_fraction), types)
    gamma, interval, n_r1 = float(dc.r1_gamma), int(dc.r1_interval), int(dc.r1_samples)
    t_lo, t_hi = int(dc.noise_aug_t_min), int(dc.noise_aug_t_max)
    rows_r1 = r1_rows(int(t.batch_size), n_r1, dc.r1_scope, int(dc.r1_groups) or data_groups) if gamma > 0 else None

    eps_map, r1_reduce, r1_offset = str(dc.eps_map), str(dc.r1_reduce), int(dc.r1_offset)

    def d_apply(dparams, x, z, td, cond):
        b, h, w = x.shape[:3]
        added = gen.added_conditions(cond, b, h, w)
        maps = disc.apply({"params": dparams}, x, z, td, cond["context"], **added)
        return readout_maps(maps, eps_map)

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

        # G's gradient as the sum of its two parts: each pulled back through G separately when their norms are
        # logged (log_grad_parts: one more G backward), else the summed cotangent once (the control, λ_GAN = 0,
        # has one part only).
        x0, g_vjp = jax.vjp(lambda p: gen(p, z, cond), state.params)
        distill_of = lambda x: jnp.mean(loss_fn(frozen["loss"], x, real, k_loss).astype(jnp.float32))
        gan_of = lambda x: ns_g_loss(d_apply(state.disc, augment(x, td, eps), z, td, cond))
        d, dx_d = jax.value_and_grad(distill_of)(x0)
        ct_d = (distill_weight * dx_d).astype(x0.dtype)
        if gan_weight != 0:
            gan, dx_g = jax.value_and_grad(gan_of)(x0)
            ct_g = (gan_weight * dx_g).astype(x0.dtype)
            if log_grad_parts:
                (g_distill,), (g_gan,) = g_vjp(ct_d), g_vjp(ct_g)
                grads = jax.tree.map(jnp.add, g_distill, g_gan)
                n_distill, n_gan = global_norm(g_distill), global_norm(g_gan)
            else:
                (grads,) = g_vjp((ct_d + ct_g).astype(x0.dtype))
        else:
            gan = gan_of(x0)
            (grads,) = g_vjp(ct_d)
            n_distill, n_gan = global_norm(grads), jnp.float32(0.0)
        loss = distill_weight * d + gan_weight * gan
        aux = {"distill": d, "gan_g": gan, "mse": jnp.mean((x0 - real) ** 2)}
        if log_grad_parts:
            aux.update({"g_grad_distill": n_distill, "g_grad_gan": n_gan,
                        "gan_grad_ratio": n_gan / jnp.maximum(n_distill, 1e-30)})  # fmt: skip
        if update == "alternating":  # D's fakes come from G after this step's update (the guarded update below
            # applies the same one: the values agree, and a non-finite step is discarded whole)
            g_updates, _ = tx.update(grads, state.opt_state, state.params)
            g_next = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, g_updates)
            fake = gen(g_next, z, cond)
        else:
            fake = x0
        xf, zf, cf = mix_and_match(plan, types, jax.lax.stop_gradient(fake), real, z, cond)
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
            acc = 0.5 * (jnp.mean(image_scores(lr_) > 0) + jnp.mean(image_scores(lf) < 0))
            return ns_d_loss(lr_, lf), {"d_real": mean_logit(lr_), "d_fake": mean_logit(lf), "d_acc": acc}

        (d_loss, d_aux), d_grads = jax.value_and_grad(d_objective, has_aux=True)(state.disc)
        r1 = jnp.float32(0.0)
        due = jnp.asarray(False)
        if gamma > 0:
            idx = rows_r1
            if np.array_equal(idx, np.arange(len(idx))):
                sub = lambda a: None if a is None else a[: len(idx)]
            else:
                sub = lambda a: None if a is None else jnp.take(a, jnp.asarray(idx), axis=0)
            c1 = {k: sub(v) for k, v in cond.items()}

            def r1_objective(dparams):
                with attention_implementation("xla"):  # second derivatives: no cuDNN flash kernel here
                    score = lambda v: r1_score(d_apply(dparams, v, sub(z), sub(td), c1), r1_reduce)
                    pen = r1_penalty(score, sub(x_real))
                return 0.5 * gamma * interval * pen, pen

            due = state.step % interval == r1_offset
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


def make_d_eval(gen, disc: Discriminator, text, dc):
    """D's held-out read-out `(params, dparams, frozen, batch, key) → metrics`: G(z, c) of `params` against the
    batch's real latents, both through D as the step's D pass sees them (same timestep / noise augmentation, no
    mix-and-match): per read-out map the mean real and fake logit (`map{i}_real` / `map{i}_fake`, map 0 = the ε-map),
    and the per-image accuracy (`acc`: the sign of an image's mean logit over the maps; real and fake halves
    weighted equally, `acc_real`, `acc_fake`). Held-out pairs: D never trained on them."""
    ac = np.asarray(gen.schedule.alphas_cumprod, np.float32)
    eps_map = str(dc.eps_map)
    t_lo, t_hi = int(dc.noise_aug_t_min), int(dc.noise_aug_t_max)

    def ev(params, dparams, frozen, batch, key):
        z, real = batch["noise"], batch["latent"]
        b = z.shape[0]
        cond = text.embed(frozen["text"], batch["ids"], batch["masks"])
        fake = gen(params, z, cond)
        if dc.noise_aug:
            k_t, k_e = jax.random.split(key)
            td = jax.random.randint(k_t, (b,), t_lo, t_hi + 1)
            e = jax.random.normal(k_e, real.shape, jnp.float32)
            a = jnp.sqrt(jnp.asarray(ac)[td]).reshape(-1, 1, 1, 1)
            s = jnp.sqrt(1.0 - jnp.asarray(ac)[td]).reshape(-1, 1, 1, 1)
            real, fake = a * real + s * e, a * fake + s * e
        else:
            td = jnp.full((b,), int(dc.timestep), jnp.int32)

        def maps_of(x):
            added = gen.added_conditions(cond, b, x.shape[1], x.shape[2])
            return readout_maps(disc.apply({"params": dparams}, x, z, td, cond["context"], **added), eps_map)

        mr, mf = maps_of(real), maps_of(fake)
        out = {"acc_real": jnp.mean(image_scores(mr) > 0), "acc_fake": jnp.mean(image_scores(mf) < 0)}
        out["acc"] = 0.5 * (out["acc_real"] + out["acc_fake"])
        for i, (r, f) in enumerate(zip(mr, mf)):
            out[f"map{i}_real"], out[f"map{i}_fake"] = jnp.mean(r), jnp.mean(f)
        return out

    return ev
