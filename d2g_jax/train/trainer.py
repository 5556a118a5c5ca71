"""Stage 1 of Diffusion2GAN (paper §3.1–3.2, Table A1): ODE distillation of the teacher into a one-step generator.

    L = E-LatentLPIPS(G(z, c), x0_teacher)   (+ the official L1 term; E-LatentLPIPS* for SD-CFG-3)

`Trainer(config, workdir).run()` builds everything from the config and the teacher folder, restores the latest
checkpoint of `<workdir>/stage1/` if there is one, and trains to `config.train.num_steps`:

* the step is one jitted pure function `(state, frozen, batch) → (state, metrics)` with explicit in/out shardings
  on a `(data, fsdp)` mesh; the state is donated; gradient accumulation is a `lax.scan` over micro-batches;
* bf16 compute (`config.train.dtype`) on fp32 master weights; optional `nn.remat` of every U-Net block;
* non-finite loss or gradients: that update is not applied (the state stays the last good one), the run stops
  with a message naming the step, and the last checkpoint on disk is left as it is;
* clu writers (TensorBoard + log): loss, E-LatentLPIPS, MSE, lr, grad norm, img/s, step time; held-out metrics
  every `eval_every`; a teacher-vs-student sample grid (VAE-decoded PNG) every `sample_every`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from d2g_jax import sharding as shd
from d2g_jax.train.generator import Generator
from d2g_jax.train.optim import ema_update, optimizer_from_config
from d2g_jax.train.state import TrainState, put_global, state_shardings

LOSS_KINDS = {
    "e_latent_lpips": "ensemble",  # E-LatentLPIPS (SD-CFG-8, SDXL-CFG-7)
    "e_latent_lpips_star": "star",  # mean of E-LatentLPIPS and LatentLPIPS (SD-CFG-3)
    "latent_lpips": "plain",  # LatentLPIPS without augmentation (ablation, Table 1)
    "lpips_pixel": None,  # VAE decode + pixel LPIPS-VGG (ablation, Table 1)
    "mse": None,  # plain MSE regression (ablation)
}


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf."""


# ----------------------------------------------------------------------------------------------------------
# Loss.


@functools.lru_cache(maxsize=None)
def _random_lpips_cached(encoder: str, seed: int):
    from d2g_jax.losses.elatentlpips import random_latent_lpips

    return random_latent_lpips(encoder, seed)


def load_distill_loss(config: ml_collections.ConfigDict, teacher_folder: str):
    """`(loss_fn, frozen_vars)` with `loss_fn(vars, x0, target, rng) → ([B] distance, [B] eval-plain distance)`."""
    lc = config.loss
    if lc.kind not in LOSS_KINDS:
        raise ValueError(f"config.loss.kind={lc.kind!r}: choose one of {sorted(LOSS_KINDS)}.")
    dtype = jnp.dtype(lc.dtype or config.train.dtype)
    if lc.kind == "mse":
        return (lambda v, x, y, rng: jnp.mean((x - y) ** 2, axis=(1, 2, 3))), {}
    if lc.kind == "lpips_pixel":
        from d2g_jax.losses.elatentlpips import pixel_lpips, vae_decoder
        from d2g_jax.losses.latent_vgg import load_pixel_lpips
        from d2g_jax.models.vae import load_vae

        if not (lc.pixel_vgg16 and lc.pixel_lin):
            raise ValueError("config.loss.kind='lpips_pixel' needs config.loss.pixel_vgg16 (torchvision "
                             "vgg16-397923af.pth) and config.loss.pixel_lin (lpips weights/v0.1/vgg.pth).")  # fmt: skip
        vae_mod, vae_vars = load_vae(teacher_folder, dtype=dtype, parts=("decoder",))
        _, lp_vars = load_pixel_lpips(lc.pixel_vgg16, lc.pixel_lin, dtype=dtype)

        def pixel(v, x, y, rng):
            return pixel_lpips(v["lpips"], x, y, vae_decoder(vae_mod, v["vae"]), dtype=dtype)

        return pixel, {"lpips": lp_vars, "vae": vae_vars}
    from d2g_jax.losses.elatentlpips import e_latent_lpips, load_latent_lpips

    if lc.random_weights:
        logging.warning("config.loss.random_weights=True: E-LatentLPIPS uses a RANDOM latent VGG (tiny/debug runs "
                        "only; real runs load the official checkpoints from config.loss.ckpt_dir).")  # fmt: skip
        variables = _random_lpips_cached(lc.encoder, int(config.seed))
    else:
        if not lc.ckpt_dir:
            raise ValueError("config.loss.ckpt_dir is empty: point it at the folder holding the official "
                             f"{lc.encoder}_latent_vgg16.pth.tar and {lc.encoder}_latest_vgg16_tuned.pth "
                             "(from the elatentlpips release).")  # fmt: skip
        _, variables = load_latent_lpips(lc.ckpt_dir, lc.encoder, dtype=dtype)
    mode = LOSS_KINDS[lc.kind]

    def latent(v, x, y, rng):
        return e_latent_lpips(v, x, y, rng, preset=lc.augment, l1=lc.l1, normalize=False, encoder=lc.encoder,
                              mode=mode, dtype=dtype)  # fmt: skip

    return latent, variables


# ----------------------------------------------------------------------------------------------------------
# The step.


def split_micro(batch: Mapping[str, Any], accum: int) -> Any:
    """[B, ...] → [accum, B/accum, ...] taking rows k, k+accum, ... for micro-batch k, which keeps every
    micro-batch split over the devices exactly like the full batch (no resharding)."""

    def one(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(one, batch)


def make_train_step(gen: Generator, text: Any, loss_fn, t: ml_collections.ConfigDict, tx, lr_fn, weight: float):
    """The pure stage-1 step `(state, frozen, batch) → (state, metrics)`.

    `frozen = {"text": text-encoder params, "loss": loss variables}`; `batch = {"noise", "latent": [B, h, w, c],
    "ids": (per encoder [B, T] int32), "masks": (same)}`.
    """
    accum = int(t.grad_accum)

    def loss_and_aux(params, frozen, mb, rng):
        cond = jax.lax.stop_gradient(text.embed(frozen["text"], mb["ids"], mb["masks"]))
        x0 = gen(params, mb["noise"], cond)
        d = loss_fn(frozen["loss"], x0, mb["latent"], rng).astype(jnp.float32)
        mse = jnp.mean((x0 - mb["latent"]) ** 2)
        return weight * jnp.mean(d), {"distill": jnp.mean(d), "mse": mse}

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, frozen, batch, rng)
        else:
            micro = split_micro(batch, accum)

            def body(carry, xs):
                k, mb = xs
                (loss_k, a), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, k))
                gsum, lsum, asum = carry
                return (jax.tree.map(jnp.add, gsum, g), lsum + loss_k, jax.tree.map(jnp.add, asum, a)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.float32(0), {"distill": jnp.float32(0), "mse": jnp.float32(0)})
            (grads, loss, aux), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, aux = loss / accum, jax.tree.map(lambda a: a / accum, aux)
        gnorm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        step_next = state.step + jnp.where(finite, 1, 0).astype(state.step.dtype)
        ema = keep(ema_update(state.ema, params, step_next, int(t.ema_start), float(t.ema_beta)), state.ema)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": lr_fn(state.step), "finite": finite, **aux}
        return state.replace(step=step_next, params=params, ema=ema, opt_state=opt_state), metrics

    return step


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------------------
# Images.


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows of [N, H, W, 3] images in [-1, 1] → one uint8 [R·H, N·W, 3] grid."""
    out = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# The trainer.


class Trainer:
    """Stage-1 training of a run directory (see the module docstring)."""

    stage = "stage1"

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, teacher_folder: str, pairs_dir: str):
        from d2g_jax.data.loader import PairsSource, make_loader
        from d2g_jax.models.text import TextEncoder
        from d2g_jax.models.unet import abstract_variables, load_unet
        from d2g_jax.sampling import DDIMSchedule, _vae_scale_factor, pipeline_fingerprint
        from d2g_jax.train import checkpoint as ckpt

        self.config, self.workdir, self.teacher_folder = config, workdir, teacher_folder
        self.dir = os.path.join(workdir, self.stage)
        t = self.t = self.stage_config()
        self.mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
        n_dev = self.mesh.size
        if t.batch_size % (n_dev * t.grad_accum):
            raise ValueError(f"config.train.batch_size={t.batch_size} must be a multiple of grad_accum "
                             f"({t.grad_accum}) × the {n_dev} devices.")  # fmt: skip
        fingerprint = pipeline_fingerprint(teacher_folder)
        expect = {"teacher": fingerprint}
        source = PairsSource(pairs_dir, expect=expect)  # pairs of another teacher → PairsError, before any write
        ckpt.check_run(workdir, config, {"teacher_fingerprint": fingerprint})

        dtype = jnp.dtype(t.dtype)
        self.text = TextEncoder.from_pipeline(teacher_folder, dtype=dtype)
        unet, variables = load_unet(os.path.join(teacher_folder, "unet"), dtype=dtype, param_dtype=jnp.float32,
                                    remat_policy=t.remat)  # fmt: skip
        self.unet = unet
        self.gen = Generator(unet, DDIMSchedule.from_pipeline(teacher_folder), _vae_scale_factor(teacher_folder))
        self.loss_fn, loss_vars = load_distill_loss(config, teacher_folder)

        # Data: the first N − holdout pairs train, the last `holdout` are held out for evaluation and samples.
        n_pairs = len(source)
        holdout = min(int(t.holdout), n_pairs // 2)
        self.source, self.holdout = source, holdout
        self.loader = make_loader(source, global_batch_size=t.batch_size, seed=self.data_seed(),
                                  limit=n_pairs - holdout, read_threads=4, prefetch=int(t.prefetch))  # fmt: skip

        # Shardings.
        rep = shd.replicated(self.mesh)
        boxed = abstract_variables(unet)["params"]
        self.param_sh = shd.param_shardings(boxed, self.mesh)  # boxes → NamedShardings
        self.tx, self.lr_fn = optimizer_from_config(self.param_sh, t, int(t.num_steps))
        self.frozen = {
            "text": put_global(self.text.params, jax.tree.map(lambda _: rep, self.text.params)),
            "loss": put_global(loss_vars, jax.tree.map(lambda _: rep, loss_vars)),
        }
        self.frozen_sh = jax.tree.map(lambda _: rep, self.frozen)
        self.init_params = variables["params"]
        self.abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                            self.init_params)  # fmt: skip
        self.batch_axes = shd.MESH_AXES
        self.batch_sh = self._batch_shardings()
        abstract_state, step = self.build_step()
        self.state_sh = state_shardings(abstract_state, self.param_sh, self.mesh, getattr(self, "disc_sh", None))
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract_state, self.state_sh)  # fmt: skip
        self.step_fn = jax.jit(step, in_shardings=(self.state_sh, self.frozen_sh, self.batch_sh),
                               out_shardings=(self.state_sh, rep), donate_argnums=(0,))  # fmt: skip
        self.mgr = ckpt.manager(os.path.join(self.dir, "checkpoints"), int(t.keep), bool(t.async_ckpt))
        self._eval_fn = None
        self._vae = None

    def stage_config(self) -> ml_collections.ConfigDict:
        """The G training fields of this stage (stage 1: `config.train`)."""
        return self.config.train

    def data_seed(self) -> int:
        """Seed of this stage's data order."""
        return int(self.config.seed)

    def build_step(self) -> tuple[TrainState, Any]:
        """`(abstract TrainState, pure step)` of this stage."""
        abstract_state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params, ema=self.abstract_params,
            opt_state=jax.eval_shape(self.tx.init, self.abstract_params),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        )  # fmt: skip
        step = make_train_step(self.gen, self.text, self.loss_fn, self.t, self.tx, self.lr_fn,
                               float(self.config.loss.weight))  # fmt: skip
        return abstract_state, step

    # --- batches ---

    def _batch_shardings(self) -> dict[str, Any]:
        b4 = NamedSharding(self.mesh, P(self.batch_axes, None, None, None))
        b2 = NamedSharding(self.mesh, P(self.batch_axes, None))
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
        return put_global(host, self.batch_sh)

    # --- state ---

    def initial_state(self) -> TrainState:
        params = put_global(self.init_params, self.param_sh)
        ema = put_global(self.init_params, self.param_sh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
        rng = put_global(np.asarray(jax.random.PRNGKey(int(self.config.seed) + 1), np.uint32), self.state_sh.rng)
        step = put_global(np.int32(0), self.state_sh.step)
        return TrainState(step=step, params=params, ema=ema, opt_state=opt_state, rng=rng)

    def restore_or_init(self) -> TrainState:
        from d2g_jax.train import checkpoint as ckpt

        latest = self.mgr.latest_step()
        if latest is None:
            logging.info("%s: no checkpoint in %s, starting afresh", self.stage, self.dir)
            return self.initial_state()
        logging.info("%s: restoring step %d from %s", self.stage, latest, self.dir)
        return ckpt.restore(self.mgr, latest, self.abstract_state, self.loader)

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
        if self._eval_fn is None:
            from d2g_jax.losses.elatentlpips import e_latent_lpips

            self._eval_batches_cache = self._eval_batches()
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
            self._eval_fn = jax.jit(ev, in_shardings=(self.param_sh, self.frozen_sh, self.batch_sh, rep),
                                    out_shardings=rep)  # fmt: skip
        batches = self._eval_batches_cache
        if not batches:
            return {}
        out: dict[str, float] = {}
        key = put_global(np.asarray(jax.random.PRNGKey(12345), np.uint32), shd.replicated(self.mesh))
        for name, params in (("", state.params), ("ema_", state.ema)):
            acc: dict[str, float] = {}
            for b in batches:
                for k, v in jax.device_get(self._eval_fn(params, self.frozen, b, key)).items():
                    acc[k] = acc.get(k, 0.0) + float(v) / len(batches)
            out.update({f"eval/{name}{k}": v for k, v in acc.items()})
        self._jsonl({"step": int(jax.device_get(state.step)), **out})
        return out

    def _vae_decoder(self) -> tuple[Any, Any]:
        """The teacher's VAE decoder `(module, replicated variables)`, loaded once for sample grids and evaluation."""
        if getattr(self, "_decoder", None) is None:
            from d2g_jax.models.vae import load_vae

            mod, variables = load_vae(self.teacher_folder, parts=("decoder",))
            rep = shd.replicated(self.mesh)
            self._decoder = (mod, put_global(variables, jax.tree.map(lambda _: rep, variables)))
        return self._decoder

    def sample_grid(self, state: TrainState, step: int) -> str | None:
        """Teacher (50-step ODE, from the pairs) vs student (one step, EMA) on fixed held-out noises/prompts."""
        n = min(int(self.t.num_samples), self.holdout)
        if n == 0:
            return None
        if self._vae is None:
            mod, vae_vars = self._vae_decoder()
            rep = shd.replicated(self.mesh)
            pairs = self.holdout_pairs(n)
            ids, masks = self._tokens(pairs["prompt"])
            host = {"noise": pairs["noise"], "latent": pairs["latent"], "ids": ids, "masks": masks}
            inputs = put_global(host, jax.tree.map(lambda _: rep, host))

            def student_and_teacher(params, frozen, vae_vars, b):
                cond = self.text.embed(frozen["text"], b["ids"], b["masks"])
                x0 = self.gen(params, b["noise"], cond)
                dec = lambda z: mod.apply(vae_vars, z, method="decode_latents")
                return dec(b["latent"]), dec(x0)

            self._vae = (jax.jit(student_and_teacher, out_shardings=rep), vae_vars, inputs)
        fn, vae_vars, inputs = self._vae
        teacher_img, student_img = jax.device_get(fn(state.ema, self.frozen, vae_vars, inputs))
        grid = image_grid([np.asarray(teacher_img, np.float32), np.asarray(student_img, np.float32)])
        path = None
        if jax.process_index() == 0:
            os.makedirs(os.path.join(self.dir, "samples"), exist_ok=True)
            path = os.path.join(self.dir, "samples", f"step_{step:08d}.png")
            write_png(path, grid)
        self.writer.write_images(step, {"samples/teacher_top_student_bottom": grid[None]})
        return path

    def paper_eval(self, state: TrainState, step: int) -> dict[str, Any]:
        """The paper's metrics (`config.eval`: FID, P&R, CLIP score, DreamSim, DreamDiv) of the EMA generator on
        `eval.subset` images, every `eval.every` steps: clu scalars `paper_eval/*` and
        `<workdir>/eval/<stage>_step_<N>_subset<n>.json` (see d2g_jax/eval/evaluate.py)."""
        from d2g_jax.eval.evaluate import Evaluator, write_results
        from d2g_jax.generate import OneStepSampler

        if getattr(self, "_paper_eval", None) is None:
            e = self.config.eval
            evaluator = Evaluator(self.config, self.workdir, int(e.subset))
            n_dev = self.mesh.size
            batch = -(-(int(e.batch_size) or n_dev) // n_dev) * n_dev
            teacher = None
            if evaluator.needs_teacher:  # DreamSim / teacher_dist; the teacher's U-Net = G's initial weights
                teacher = put_global(self.init_params, self.param_sh)
            shape = tuple(np.shape(self.source[0]["noise"]))
            sampler = OneStepSampler(self.gen, None, self.text, self._vae_decoder(), self.mesh, shape, batch,
                                     self.gen.schedule, teacher)  # fmt: skip
            self._paper_eval = (evaluator, sampler)
        evaluator, sampler = self._paper_eval
        sampler.params = state.ema
        p = self.config.pairs
        results = evaluator.run(sampler, teacher_ode=(float(p.guidance_scale), int(p.num_steps)))
        scalars = {f"paper_eval/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}
        self.writer.write_scalars(step, scalars)
        write_results(self.workdir, f"{self.stage}_step_{step:08d}_subset{evaluator.num}", step, results,
                      {"generator": f"{self.stage} EMA at step {step}", "subset": True})  # fmt: skip
        logging.info("%s step %d: paper metrics on %d images: %s", self.stage, step, evaluator.num, results)
        return results

    # --- the loop ---

    def run(self) -> TrainState:
        from clu import metric_writers, periodic_actions

        from d2g_jax.train import checkpoint as ckpt

        t = self.t
        num_steps = int(t.num_steps)
        os.makedirs(self.dir, exist_ok=True)
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
        report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=self.writer,
                                                 every_secs=float(self.config.log_every_s))  # fmt: skip
        last_ckpt = start
        pending = None  # (step, metrics) whose `finite` flag has not been read yet
        t_log, steps_since = time.perf_counter(), 0
        logged: list[dict[str, Any]] = []
        step = start
        while step < num_steps:
            batch = self.global_batch(next(self.loader))
            state, metrics = self.step_fn(state, self.frozen, batch)
            step += 1
            steps_since += 1
            if pending is not None:
                self._check_finite(*pending, last_ckpt)
            pending = (step, metrics)
            report(step)
            if step % int(t.log_every) == 0 or step == num_steps:
                m = jax.device_get(metrics)
                self._check_finite(step, m, last_ckpt)
                dt = (time.perf_counter() - t_log) / steps_since
                scalars = {k: float(v) for k, v in m.items() if k != "finite"}
                scalars.update({"step_time_s": dt, "img_per_s": t.batch_size / dt})
                self.writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                self._jsonl({"step": step, **{k: float(v) for k, v in m.items() if k != "finite"}})
                logged.append({"step": step, **scalars})
                t_log, steps_since = time.perf_counter(), 0
            stop = int(t.stop_after) > 0 and step - start >= int(t.stop_after)
            if self._preempted(step):
                logging.warning("%s: preemption signal: checkpointing step %d and exiting.", self.stage, step)
                stop = True
            if _due(step, t.eval_every, num_steps):
                self.writer.write_scalars(step, self.evaluate(state))
            if _due(step, t.sample_every, num_steps):
                self.sample_grid(state, step)
            if _due(step, int(self.config.eval.every), num_steps):
                self.paper_eval(state, step)
            if _due(step, t.ckpt_every, num_steps) or stop:
                self._check_finite(*pending, last_ckpt)
                pending = None
                ckpt.save(self.mgr, step, state, self.loader)
                last_ckpt = step
            if stop:
                logging.warning("%s: stopping after %d steps of this process (config.train.stop_after) at step %d; "
                                "rerun the same command to resume.", self.stage, int(t.stop_after), step)  # fmt: skip
                break
        self.mgr.wait_until_finished()
        self.writer.flush()
        self.logged = logged
        return state

    def _install_sigterm(self) -> None:
        """SIGTERM (SLURM requeue/timeout, k8s eviction) → checkpoint at the next step, then exit."""
        import signal
        import threading

        self._sigterm = False
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():

            def handler(signum, frame):
                self._sigterm = True

            signal.signal(signal.SIGTERM, handler)

    def _preempted(self, step: int) -> bool:
        if jax.process_count() > 1:  # all hosts agree on the step (JAX's preemption sync service)
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return bool(getattr(self, "_sigterm", False))

    def _jsonl(self, record: Mapping[str, Any]) -> None:
        """Appends one line to `<stage>/metrics.jsonl` (process 0): the exact per-step training metrics."""
        if jax.process_index() == 0:
            import json

            with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _check_finite(self, step: int, metrics: Mapping[str, Any], last_ckpt: int) -> None:
        if bool(jax.device_get(metrics["finite"])):
            return
        self.mgr.wait_until_finished()
        loss, gn = float(jax.device_get(metrics["loss"])), float(jax.device_get(metrics["grad_norm"]))
        raise NonFiniteError(
            f"{self.stage}: non-finite loss/gradients at step {step} (loss={loss}, grad_norm={gn}); the update was "
            f"not applied and training stopped. The last good checkpoint is step {last_ckpt} in "
            f"{os.path.join(self.dir, 'checkpoints')} (left untouched). Lower config.train.lr, enable "
            "config.train.grad_clip, or check the pairs."
        )


def _due(step: int, every: int, last: int) -> bool:
    """Periodic actions: every `every` steps and at the last step; `every <= 0` disables them."""
    every = int(every)
    return every > 0 and (step % every == 0 or step == last)
