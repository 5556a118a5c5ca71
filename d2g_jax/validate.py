"""`validate(config, workdir)`: every rule of every phase the mode will run, checked before any phase starts.

A config error stops the job before anything is written (no pairs, no `run.json`, no checkpoint), with a message that
names the field and what it accepts. The rules of a phase live here, in one list per phase; where a lower layer owns
a rule (the discriminator's R1/noise ranges and mix-and-match plan, the learning-rate schedules, the loss kinds,
the augmentation presets, the eval metric names) its own checker is called, so the rule is written once.

Phases a mode runs: all = pairs + train (+ stage 2 when `stage2.num_steps > 0`) + export (+ the periodic
evaluation when `eval.every > 0`); pairs; train; export; sample; eval; verify (reads an existing workdir only:
no teacher, no phase rules). Fields a world provider fills
(`config.world.provider`: teacher.path, prompts, eval.real, …) are checked after it has filled them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

PHASES = ("pairs", "train", "export")  # in order; "all" runs each
USE_PHASES = ("sample", "eval", "serve")  # use the exported generator; never part of "all"
CHECK_MODES = ("verify",)  # checks a workdir's files (checkpoints, export, pairs) against their digests; writes nothing
MODES = ("all",) + PHASES + USE_PHASES + CHECK_MODES
DTYPES = ("float32", "bfloat16", "float16")
# Filled by a world provider when empty (d2g_jax/world/mnist.py); checked once it has run.
WORLD_FIELDS = ("teacher.path", "pairs.prompts", "eval.prompts", "eval.real", "eval.classifier", "loss.ckpt_dir",
                "sample.prompts", "report.real")  # fmt: skip


class ConfigError(ValueError):
    """A config value is out of range or contradicts another."""


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for k in field.split("."):
        node = node[k]
    return node


class _Rules:
    def __init__(self, config: ml_collections.ConfigDict, pending_world: bool):
        self.c, self.pending_world = config, pending_world

    def get(self, field: str) -> Any:
        return _get(self.c, field)

    def fail(self, msg: str) -> None:
        raise ConfigError(msg)

    def int_(self, field: str, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
        v = self.get(field)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"config.{field}={v!r} must be an integer{what}.")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"≥ {lo}" if hi is None else (f"≤ {hi}" if lo is None else f"in [{lo}, {hi}]")
            self.fail(f"config.{field}={v} must be {rng}{what}.")
        return v

    def float_(self, field: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False, what: str = "") -> float:  # fmt: skip
        v = self.get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            self.fail(f"config.{field}={v!r} must be a number{what}.")
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if below or above:
            left = "" if lo is None else ("> " if lo_open else "≥ ") + f"{lo}"
            right = "" if hi is None else ("< " if hi_open else "≤ ") + f"{hi}"
            self.fail(f"config.{field}={v} must be {' and '.join(x for x in (left, right) if x)}{what}.")
        return float(v)

    def choice(self, field: str, options, what: str = "") -> Any:
        v = self.get(field)
        if v not in options:
            self.fail(f"config.{field}={v!r}: choose one of {', '.join(map(str, options))}{what}.")
        return v

    def dtype(self, field: str, allow_empty: bool = False) -> None:
        v = self.get(field)
        if allow_empty and v == "":
            return
        self.choice(field, DTYPES, " ('' = inherit)" if allow_empty else "")

    def remat(self, field: str, allow_empty: bool = False) -> None:
        v = self.get(field)
        if (allow_empty and v == "") or v == "none":
            return
        if not hasattr(jax.checkpoint_policies, str(v)):
            self.fail(f"config.{field}={v!r}: 'none' or a jax.checkpoint_policies name (e.g. nothing_saveable, "
                      "dots_saveable).")  # fmt: skip

    def required(self, field: str, why: str) -> None:
        if self.get(field):
            return
        if self.pending_world and field in WORLD_FIELDS:
            return
        self.fail(f"config.{field} is empty: {why}")

    def divisible(self, field: str, by: int, why: str) -> None:
        v = int(self.get(field))
        if v % by:
            self.fail(f"config.{field}={v} must be a multiple of {by} ({why}).")


def phases(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The phases `config.mode` runs (+ "stage2", "periodic_eval" where they apply)."""
    mode = config.mode
    if mode not in MODES:
        raise ConfigError(f"config.mode={mode!r} is not a phase; use one of {', '.join(MODES)}.")
    out = list(PHASES) if mode == "all" else [mode]
    if mode in ("all", "train") and int(config.stage2.num_steps) > 0:
        out.append("stage2")
    if mode in ("all", "train") and int(config.eval.every) > 0:
        out.append("periodic_eval")
    if mode == "all" and config.report.enabled:
        out.append("report")
    return tuple(out)


def validate(config: ml_collections.ConfigDict, workdir: str = "") -> tuple[str, ...]:
    """Checks every rule of the phases the mode runs (see the module docstring); returns those phases."""
    if not workdir:
        raise ConfigError("--workdir is required (the run's directory: pairs, checkpoints, exports).")
    r = _Rules(config, pending_world=bool(config.world.provider) and not _world_resolved(config))
    todo = phases(config)
    if todo == ("verify",):
        if not os.path.isdir(workdir):
            r.fail(f"--workdir={workdir}: no such folder; --config.mode=verify checks an existing run's workdir.")
        return todo
    _common(r)
    _teacher(r)
    if "pairs" in todo:
        _pairs(r)
    if "train" in todo:
        _train(r)
        _loss(r)
    if "stage2" in todo or ("train" in todo and config.stage2.init_from):
        _stage2(r)
    if "export" in todo:
        r.choice("export.dtype", DTYPES)
    if "sample" in todo:
        _sample(r)
    if "serve" in todo:
        _serve(r)
    if "eval" in todo or "periodic_eval" in todo or "report" in todo:
        _eval(r, periodic="periodic_eval" in todo and "eval" not in todo and "report" not in todo)
    if "report" in todo:
        r.int_("report.grid_images", 0)
        rows = [x.strip() for x in str(r.c.report.rows).split(",") if x.strip()]
        bad = [x for x in rows if x not in REPORT_ROWS]
        if not rows or bad:
            r.fail(f"config.report.rows={r.c.report.rows!r}: a comma-separated subset of {', '.join(REPORT_ROWS)}.")
        if r.c.report.real and not os.path.isdir(r.c.report.real) and not r.pending_world:
            r.fail(f"config.report.real={r.c.report.real}: no such folder (captioned images, e.g. a world's train "
                   "split).")  # fmt: skip
    return todo


REPORT_ROWS = ("real", "teacher", "teacher_x0", "student")


def _world_resolved(config: ml_collections.ConfigDict) -> bool:
    return bool(config.teacher.path)


def _common(r: _Rules) -> None:
    r.int_("seed", 0)
    r.float_("log_every_s", 0, lo_open=True)
    r.int_("cpu.host_devices", 0)
    data, fsdp = r.int_("mesh.data"), r.int_("mesh.fsdp")
    n = jax.device_count()
    for f, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if v != -1 and v < 1:
            r.fail(f"config.{f}={v} must be ≥ 1, or -1 (= the devices not used by the other axis).")
    if data == -1 and fsdp == -1:
        r.fail("config.mesh.data and config.mesh.fsdp are both -1: at most one may take what is left.")
    d = data if data > 0 else n // fsdp
    f = fsdp if fsdp > 0 else n // data
    if d * f != n:
        r.fail(f"config.mesh.data={data} × config.mesh.fsdp={fsdp} must equal the {n} devices.")
    if r.c.world.provider and not isinstance(r.c.world.provider, str):
        r.fail(f"config.world.provider={r.c.world.provider!r} must be a module name.")
    r.int_("world.seed", 0)
    for f in [x.strip() for x in str(r.c.resume_changes).split(",") if x.strip()]:
        try:
            _get(r.c, f)
        except (KeyError, AttributeError):
            r.fail(f"config.resume_changes names {f!r}, which is not a config field.")


def _teacher(r: _Rules) -> None:
    c = r.c
    if c.teacher.tiny and c.teacher.path:
        r.fail("config.teacher.tiny=True and config.teacher.path are exclusive: set one of them.")
    if not c.teacher.tiny:
        r.required("teacher.path", "point it at a diffusers pipeline folder (e.g. --config.teacher.path="
                                   "/models/stable-diffusion-v1-5) or use configs/tiny.py.")  # fmt: skip
        if c.teacher.path and not os.path.isfile(os.path.join(c.teacher.path, "model_index.json")):
            r.fail(f"config.teacher.path={c.teacher.path}: no model_index.json there; expected a diffusers pipeline "
                   "folder.")  # fmt: skip
    r.dtype("teacher.dtype")


def _vae_downscale(teacher: str) -> int | None:
    from d2g_jax.models.weights import read_config

    try:
        n = len(read_config(os.path.join(teacher, "vae")).get("block_out_channels", ()))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return 2 ** (n - 1) if n else None


def _pairs(r: _Rules) -> None:
    c = r.c
    if not c.teacher.tiny:
        r.required("pairs.prompts", "give a .txt/.jsonl/.parquet file or tfds:NAME[:SPLIT[:FEATURE]].")
    r.int_("pairs.num_pairs", 1)
    r.int_("pairs.num_steps", 1)
    r.float_("pairs.guidance_scale", 1.0, what=" (1 = no classifier-free guidance; the paper uses 3 for SD1.5, "
                                               "8 for SD-CFG-8, 7 for SDXL)")  # fmt: skip
    res = r.int_("pairs.resolution", 8)
    r.int_("pairs.batch_size", 1)
    r.divisible("pairs.batch_size", jax.device_count(), "the teacher scan is split over every device")
    r.int_("pairs.shard_size", 1)
    r.choice("pairs.verify", ("ends", "full"))
    r.int_("pairs.seed", -1, what=" (-1 = config.seed)")
    if c.teacher.path:
        f = _vae_downscale(c.teacher.path)
        if f and res % f:
            r.fail(f"config.pairs.resolution={res} is not a multiple of the VAE's downscale factor {f} "
                   f"({c.teacher.path}/vae/config.json).")  # fmt: skip


def _optimiser(r: _Rules, section: str, num_steps: int) -> None:
    from d2g_jax.train.optim import SCHEDULES

    lr = r.float_(f"{section}.lr", 0)
    lr_end = r.float_(f"{section}.lr_end", 0)
    if lr_end > lr:
        r.fail(f"config.{section}.lr_end={lr_end} exceeds config.{section}.lr={lr}: the schedule decays from lr to "
               "lr_end (Table A1: 1e-4 → 1e-5).")  # fmt: skip
    if "lr_schedule" in _get(r.c, section):  # config.stage2 shares config.train's schedule shape and Adam
        r.choice(f"{section}.lr_schedule", SCHEDULES)
        w = r.int_(f"{section}.warmup_steps", 0)
        if w >= num_steps > 0:
            r.fail(f"config.{section}.warmup_steps={w} must be below the stage's {num_steps} steps.")
        r.float_(f"{section}.b1", 0, 1, hi_open=True)
        r.float_(f"{section}.b2", 0, 1, hi_open=True)
        r.float_(f"{section}.adam_eps", 0, lo_open=True)
        r.float_(f"{section}.weight_decay", 0)
        r.float_(f"{section}.weight_decay_attention", 0)
        r.float_(f"{section}.grad_clip", 0, what=" (0 = no clipping)")


def _cadence(r: _Rules, section: str) -> None:
    r.int_(f"{section}.log_every", 1)
    r.int_(f"{section}.eval_every", 0, what=" (0 = never)")
    r.int_(f"{section}.sample_every", 0, what=" (0 = never)")
    r.int_(f"{section}.ckpt_every", 1, what=" (the last step is always checkpointed as well)")
    r.int_(f"{section}.stop_after", 0, what=" (0 = off)")


def _train(r: _Rules) -> None:
    n_dev = jax.device_count()
    steps = r.int_("train.num_steps", 1)
    batch = r.int_("train.batch_size", 1)
    accum = r.int_("train.grad_accum", 1)
    if batch % (n_dev * accum):
        r.fail(f"config.train.batch_size={batch} must be a multiple of config.train.grad_accum ({accum}) × the "
               f"{n_dev} devices.")  # fmt: skip
    _optimiser(r, "train", steps)
    r.int_("train.ema_start", 0)
    from d2g_jax.train.optim import LR_READINGS

    r.choice("train.lr_reading", LR_READINGS)
    r.float_("train.ema_beta", 0, 1)
    r.dtype("train.dtype")
    r.remat("train.remat")
    r.int_("train.holdout", 0)
    r.int_("train.max_pairs", 0)
    r.int_("train.num_samples", 0)
    _cadence(r, "train")
    r.int_("train.keep", 1)
    r.int_("train.prefetch", 1)


def _loss(r: _Rules) -> None:
    from d2g_jax.losses.augment import check_preset
    from d2g_jax.train.distill import LOSS_KINDS

    c = r.c.loss
    kind = r.choice("loss.kind", sorted(LOSS_KINDS))
    r.float_("loss.weight", 0)
    r.float_("loss.huber_c", 0, what=" (0 = 0.00054·√d)")
    r.choice("loss.star_reduce", ("mean", "sum"))
    r.dtype("loss.dtype", allow_empty=True)
    if LOSS_KINDS[kind]:  # the latent losses
        try:
            check_preset(c.augment)
        except ValueError as e:
            r.fail(f"config.loss.augment: {e}")
        if not c.encoder:
            r.fail("config.loss.encoder is empty: the LatentVGG's latent space (sd15, sd21, sdxl, sd3, flux, or the "
                   "name of your own files).")  # fmt: skip
        if not c.random_weights:
            r.required("loss.ckpt_dir", f"point it at the folder holding {c.encoder}_latent_vgg16.pth.tar and "
                                        f"{c.encoder}_latest_vgg16_tuned.pth (the elatentlpips release), or set "
                                        "config.loss.random_weights=True for a tiny debug run.")  # fmt: skip
    if kind == "lpips_pixel" and not (c.pixel_vgg16 and c.pixel_lin):
        r.fail("config.loss.kind='lpips_pixel' needs config.loss.pixel_vgg16 (torchvision vgg16-397923af.pth) and "
               "config.loss.pixel_lin (lpips weights/v0.1/vgg.pth).")  # fmt: skip


def _stage2(r: _Rules) -> None:
    from d2g_jax.train.stage2 import check_disc_config

    c = r.c
    n_dev = jax.device_count()
    steps = r.int_("stage2.num_steps", 0, what=" (0 = no stage 2)")
    if c.stage2.init_from:
        if steps == 0:
            r.fail("config.stage2.init_from is set (stage 1 comes from another run) but config.stage2.num_steps is 0: "
                   "nothing to train.")  # fmt: skip
        ck = os.path.join(c.stage2.init_from, "stage1", "checkpoints")
        if not os.path.isdir(ck) or not os.listdir(ck):
            r.fail(f"config.stage2.init_from={c.stage2.init_from}: no stage-1 checkpoints in {ck}.")
    if steps == 0:
        return
    if int(c.train.grad_accum) != 1:
        r.fail(f"config.train.grad_accum={c.train.grad_accum}: stage 2 takes whole batches (Table A1: accumulation "
               "1) and uses config.train's accumulation; set config.train.grad_accum=1 and size "
               "config.stage2.batch_size to the devices' memory, or set config.stage2.num_steps=0.")  # fmt: skip
    batch = r.int_("stage2.batch_size", 1)
    r.divisible("stage2.batch_size", n_dev, "the batch is split over every device")
    _optimiser(r, "stage2", steps)
    r.float_("stage2.gan_weight", 0)
    r.int_("stage2.ema_start", 0)
    if not isinstance(c.stage2.ema_restart, bool):
        r.fail(f"config.stage2.ema_restart={c.stage2.ema_restart!r} must be True or False.")
    if int(c.stage2.ema_start) > 0 and not c.stage2.ema_restart:
        r.fail(f"config.stage2.ema_start={c.stage2.ema_start} needs config.stage2.ema_restart=True: a start step "
               "after 0 replaces the EMA carried over from stage 1 by G's weights (a restart); set both, or "
               "ema_start=0 to carry stage 1's EMA on.")  # fmt: skip
    from d2g_jax.train.stage2 import UPDATES

    r.choice("stage2.update_order", UPDATES)
    if not isinstance(c.stage2.log_grad_parts, bool):
        r.fail(f"config.stage2.log_grad_parts={c.stage2.log_grad_parts!r} must be True or False.")
    _cadence(r, "stage2")
    _optimiser(r, "disc", steps)
    r.remat("disc.remat", allow_empty=True)
    try:
        check_disc_config(c.disc, _num_train_timesteps(c), batch=batch, data_groups=n_dev)
    except ValueError as e:
        r.fail(str(e))


def _num_train_timesteps(c: ml_collections.ConfigDict) -> int:
    if c.teacher.path:
        from d2g_jax.models.weights import read_config

        try:
            return int(read_config(os.path.join(c.teacher.path, "scheduler"), "scheduler_config.json")
                       .get("num_train_timesteps", 1000))  # fmt: skip
        except (FileNotFoundError, OSError, ValueError, TypeError):
            return 1000
    return 1000


def _sample(r: _Rules) -> None:
    s = r.c.sample
    if s.prompts and s.prompt:
        r.fail("set exactly one of config.sample.prompts (a .txt/.jsonl/.parquet file or tfds:…) and "
               "config.sample.prompt ('a cat|a dog'); both are set.")  # fmt: skip
    if not s.prompt and not s.prompts and not r.pending_world:
        r.fail("set exactly one of config.sample.prompts (a .txt/.jsonl/.parquet file or tfds:…) and "
               "config.sample.prompt ('a cat|a dog'); neither is set.")  # fmt: skip
    if s.prompt and any(not p.strip() for p in s.prompt.split("|")):
        r.fail(f"config.sample.prompt={s.prompt!r} has an empty prompt between '|'s.")
    r.int_("sample.images_per_prompt", 1)
    r.int_("sample.num_prompts", 0, what=" (0 = all)")
    r.int_("sample.batch_size", 0, what=" (0 = one image per device)")
    r.int_("sample.grid_columns", 1)
    r.int_("sample.seed", 0)
    r.dtype("sample.dtype", allow_empty=True)
    if s.unet and not os.path.isfile(os.path.join(s.unet, "config.json")):
        r.fail(f"config.sample.unet={s.unet}: no config.json there; expected a diffusers U-Net folder such as "
               "<workdir>/export/step_<N>/unet.")  # fmt: skip
    if s.out_dir and os.path.isdir(s.out_dir) and os.listdir(s.out_dir):
        r.fail(f"config.sample.out_dir={s.out_dir}: exists and is not empty; give a new or empty folder (nothing in "
               "an existing one is overwritten).")  # fmt: skip


def _serve(r: _Rules) -> None:
    s = r.c.serve
    if not isinstance(s.host, str) or not s.host.strip() or any(ch in s.host for ch in "/ "):
        r.fail(f"config.serve.host={s.host!r} must be an address to bind: 127.0.0.1 (localhost, the default), "
               "0.0.0.0 (every interface) or one interface's address.")  # fmt: skip
    r.int_("serve.port", 0, 65535, what=" (0 = any free port)")
    r.int_("serve.max_images", 1, 64, what=" (images per request; each batch size up to it is compiled)")
    r.int_("serve.queue", 1, 4096)
    if not isinstance(s.teacher, bool):
        r.fail(f"config.serve.teacher={s.teacher!r} must be True or False.")
    r.dtype("sample.dtype", allow_empty=True)
    if r.c.sample.unet and not os.path.isfile(os.path.join(r.c.sample.unet, "config.json")):
        r.fail(f"config.sample.unet={r.c.sample.unet}: no config.json there; expected a diffusers U-Net folder such "
               "as <workdir>/export/step_<N>/unet.")  # fmt: skip


def _eval(r: _Rules, periodic: bool) -> None:
    from d2g_jax.eval.evaluate import parse_metrics

    c, e = r.c, r.c.eval
    try:
        names = set(parse_metrics(e.metrics))
    except ValueError as err:
        r.fail(str(err))
    r.int_("eval.num_images", 1)
    if periodic:
        r.int_("eval.subset", 1)
    r.int_("eval.batch_size", 0, what=" (0 = sample.batch_size)")
    r.int_("eval.resolution", 1)
    r.int_("eval.seed", 0)
    if not e.images and not c.teacher.tiny:
        r.required("eval.prompts", "give COCO's captions_val2014.json (FID-30k) or captions_val2017.json (5k), or a "
                                   ".txt/.jsonl/.parquet/tfds: prompt list.")  # fmt: skip
    if {"fid", "pr", "fd", "fd_pr"} & names:
        r.required("eval.real", "FID / FD and precision & recall need the real images (a folder, e.g. COCO "
                                "val2014/, or tfds:NAME:SPLIT[:FEATURE]); or drop them from "
                                "config.eval.metrics.")  # fmt: skip
    if {"pr", "fd_pr"} & names:
        r.int_("eval.pr_num", 1)
        r.int_("eval.pr_k", 1)
    if "dreamdiv" in names:
        r.int_("eval.dreamdiv_prompts", 1)
        r.int_("eval.dreamdiv_per_prompt", 2, what=" (DreamDiv compares images of one prompt)")
    if "dreamsim" in names:
        r.int_("eval.dreamsim_num", 1)
    if not e.random_extractors:
        if {"fid", "pr"} & names:
            r.required("eval.inception", "FID / precision & recall need clean-fid's inception-2015-12-05.pt.")
        if "clip" in names:
            r.required("eval.clip", "the CLIP score needs a transformers CLIPModel folder (paper: OpenCLIP ViT-g-14).")
        if {"dreamsim", "dreamdiv"} & names:
            r.required("eval.dreamsim", "DreamSim / DreamDiv need the unzipped DreamSim release folder.")
    if {"fd", "fd_pr", "prompt_acc", "teacher_dist"} & names:
        r.required("eval.classifier", "fd, fd_pr, prompt_acc and teacher_dist need an attribute classifier folder "
                                      "(d2g_jax/eval/attributes.py).")  # fmt: skip
        if "teacher_dist" in names:
            r.int_("eval.teacher_dist_num", 1)
    if e.images:
        if periodic:
            r.fail("config.eval.images (a folder of images) applies to --config.mode=eval only, not to the periodic "
                   "evaluation of the generator during training (config.eval.every).")  # fmt: skip
        if not os.path.isdir(e.images):
            r.fail(f"config.eval.images={e.images}: no such folder.")
        bad = {"teacher_dist", "dreamsim", "dreamdiv"} & names
        if bad:
            r.fail(f"config.eval.images scores fixed images: drop {sorted(bad)} from config.eval.metrics (they "
                   "generate images with the teacher or several seeds).")  # fmt: skip
        r.int_("eval.images_num", 0, what=" (0 = all)")
    if e.unet and not os.path.isfile(os.path.join(e.unet, "config.json")):
        r.fail(f"config.eval.unet={e.unet}: no config.json there; expected a diffusers U-Net folder.")
