"""The job behind `d2g_jax.main`: teacher pairs → stage 1 → stage 2 → export of the EMA generator, and the use
modes (sample, eval) of what it exported. The orchestrator: the only module that imports train/, export, generate
and eval/ together; nothing below imports it (docs/ARCHITECTURE.md).

Each phase is resumable: rerunning the same command skips what is complete and continues what is not.
`config.mode` selects one phase ("pairs", "train" = both stages, "export") or all of them in order ("all");
"sample" and "eval" use the exported generator afterwards; "verify" checks a workdir's files (`run_verify`).
`validate(config)` runs first: a config error of any phase the mode will run stops the job before anything is
written.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from d2g_jax import console
from d2g_jax import sharding as shd
from d2g_jax import workdir as wd
from d2g_jax.data.pairs_writer import generate_pairs, read_manifest
from d2g_jax.data.prompts import read_prompts
from d2g_jax.eval.evaluate import Evaluator, ImageFolder, eval_extra, parse_metrics, write_results
from d2g_jax.export import ExportError, export_generator, verify_export
from d2g_jax.generate import OneStepSampler, check_out_dir, sample_prompts, write_samples
from d2g_jax.sampling import Teacher
from d2g_jax.train.stage2_trainer import Stage2Trainer
from d2g_jax.train.trainer import PeriodicJob, Trainer
from d2g_jax.validate import validate


def resolve_world(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """With `config.world.provider` (e.g. "d2g_jax.world.mnist"): imports that module by name, lets its
    `prepare(config, workdir)` check/write the world's files, and fills the config fields it names that are empty
    (a value given on the command line wins). Returns the config to run (locked); unchanged without a provider."""
    provider = config.world.provider
    if not provider:
        return config
    import importlib

    try:
        module = importlib.import_module(provider)
    except ImportError as e:
        raise ValueError(f"config.world.provider={provider!r}: cannot import it ({e}).") from None
    if not callable(getattr(module, "prepare", None)):
        raise ValueError(f"config.world.provider={provider!r}: the module has no prepare(config, workdir).")
    overrides = module.prepare(config, workdir)
    resolved = ml_collections.ConfigDict(config.to_dict())
    for field, value in overrides.items():
        node, *path = field.split(".")
        parent = resolved[node]
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1] if path else node
        if key not in parent:
            raise ValueError(f"{provider}.prepare returned {field!r}, which is not a config field.")
        if parent[key] in ("", None):
            parent[key] = value
        elif parent[key] != value:
            logging.info("world: keeping config.%s=%r (the world would use %r)", field, parent[key], value)
    resolved.lock()
    logging.info("world: %s (%s)", provider, config.world.dir or "shipped")
    return resolved


# ------------------------------------------------------------------------------------------------------------
# The training phases.


def pairs_seed(config: ml_collections.ConfigDict) -> int:
    """The pairs' noise seed: `pairs.seed`, or `config.seed` when it is -1."""
    return int(config.seed) if int(config.pairs.seed) < 0 else int(config.pairs.seed)


def run_pairs(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Phase 1: the teacher's DDIM ODE on (noise, prompt) → ArrayRecord pair shards (resumable)."""
    path = wd.teacher_path(config, workdir)
    p = config.pairs
    if config.teacher.tiny and not p.prompts:
        prompts = list(wd.TINY_PROMPTS)
    else:
        prompts = read_prompts(p.prompts, field=p.prompt_field or None)
    teacher = Teacher.from_pipeline(path, dtype=jnp.dtype(config.teacher.dtype))
    if p.resolution % teacher.vae_scale_factor:
        raise ValueError(f"config.pairs.resolution={p.resolution} is not a multiple of the VAE's downscale "
                         f"factor {teacher.vae_scale_factor} ({path}/vae/config.json).")  # fmt: skip
    side = p.resolution // teacher.vae_scale_factor
    manifest = generate_pairs(
        wd.pairs_dir(config, workdir), teacher, prompts, guidance_scale=p.guidance_scale, num_steps=p.num_steps,
        latent_size=(side, side), seed=pairs_seed(config), num_pairs=p.num_pairs,
        batch_size=p.batch_size // jax.process_count(), shard_size=p.shard_size, log_every_s=config.log_every_s,
        verify=p.verify,
    )  # fmt: skip
    return manifest


def make_trainer(config: ml_collections.ConfigDict, workdir: str, stage: str) -> Trainer:
    pdir = wd.pairs_dir(config, workdir)
    manifest = read_manifest(pdir)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"{pdir}: no complete pair set; run the pairs phase first "
                                "(--config.mode=pairs, or --config.mode=all).")  # fmt: skip
    cls = Stage2Trainer if stage == "stage2" else Trainer
    return cls(config, workdir, wd.teacher_path(config, workdir), pdir)


def eval_batch(config: ml_collections.ConfigDict, mesh) -> int:
    """The generation batch of every evaluation (eval mode and periodic): `eval.batch_size`, else
    `sample.batch_size`, else one image per device — rounded up to a multiple of the devices."""
    return shd.round_batch(int(config.eval.batch_size) or int(config.sample.batch_size) or mesh.size, mesh)


def paper_eval_job(config: ml_collections.ConfigDict, workdir: str) -> PeriodicJob | None:
    """The paper's metrics (`config.eval`) of the EMA generator on `eval.subset` images every `eval.every` steps:
    `<workdir>/eval/<stage>_step_<N>_subset<n>.json` and `paper_eval/*` scalars."""
    e = config.eval
    if int(e.every) <= 0:
        return None
    built: dict[str, Any] = {}
    teacher_ode = (float(config.pairs.guidance_scale), int(config.pairs.num_steps))

    def fn(trainer: Trainer, state, step: int) -> dict[str, Any]:
        if built.get("stage") != trainer.stage:  # one evaluator and sampler per stage (shapes, meshes)
            evaluator = Evaluator(config, workdir, int(e.subset))
            teacher = shd.put_global(trainer.init_params, trainer.param_sh) if evaluator.needs_teacher else None
            shape = tuple(np.shape(trainer.source[0]["noise"]))
            sampler = OneStepSampler(trainer.gen, None, trainer.text, trainer.vae_decoder(), trainer.mesh, shape,
                                     eval_batch(config, trainer.mesh), trainer.gen.schedule, teacher)  # fmt: skip
            built.update(stage=trainer.stage, evaluator=evaluator, sampler=sampler)
        evaluator, sampler = built["evaluator"], built["sampler"]
        sampler.params = state.ema
        results = evaluator.run(sampler, teacher_ode=teacher_ode)
        write_results(workdir, f"{trainer.stage}_step_{step:08d}_subset{evaluator.num}", step, results,
                      {"generator": f"{trainer.stage} EMA at step {step}", "subset": True})  # fmt: skip
        logging.info("%s step %d: %s", trainer.stage, step, _metrics_line(results))
        return results

    return PeriodicJob("paper_eval", int(e.every), fn)


def run_train(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Phase 2: stage 1 (ODE distillation with E-LatentLPIPS), then stage 2 (+ the conditional GAN) when
    `config.stage2.num_steps > 0`; each resumes from its latest checkpoint. Returns False when a stage stopped
    early (stop_after or a preemption signal, checkpointed): the job then ends there and the same command
    continues it."""
    stages = ["stage1"] if not config.stage2.init_from else []
    if wd.final_stage(config) == "stage2":
        stages.append("stage2")
    job = paper_eval_job(config, workdir)
    for stage in stages:
        trainer = make_trainer(config, workdir, stage)
        state = trainer.run(jobs=[job] if job else [])
        step = int(jax.device_get(state.step))
        if step < int(trainer.t.num_steps):
            logging.warning("%s stopped at step %d of %d (checkpointed); rerun the same command to continue.",
                            stage, step, int(trainer.t.num_steps))  # fmt: skip
            return False
    return True


def run_export(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Phase 3: the final stage's EMA generator → `<export.dir>/step_<N>/unet` (d2g_jax/export.py)."""
    return export_generator(config, workdir, wd.teacher_path(config, workdir))


# ------------------------------------------------------------------------------------------------------------
# The use modes.


def generator_unet(config: ml_collections.ConfigDict, workdir: str, field: str = "sample.unet") -> str:
    """The U-Net folder to use: `config.<field>` if set, else the run's latest export (exporting the latest
    checkpoint first when there is none)."""
    section, name = field.split(".")
    explicit = config[section][name]
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "config.json")):
            raise FileNotFoundError(f"config.{field}={explicit}: no config.json there; expected a diffusers U-Net "
                                    "folder such as <workdir>/export/step_<N>/unet.")  # fmt: skip
        verify_export(explicit)  # an export of ours (export.json next to it): its files' digests
        return explicit
    found = wd.latest_export(wd.export_root(config, workdir))
    if found is None:
        logging.info("no export yet: exporting the latest checkpoint first")
        return run_export(config, workdir)
    verify_export(found)
    return found


def _classifier_annotate(config: ml_collections.ConfigDict):
    """`annotate(images, prompts, who)` for samples.jsonl from `config.eval.classifier` (None if unset)."""
    if not config.eval.classifier:
        return None
    from d2g_jax.eval.attributes import load_classifier

    clf = load_classifier(config.eval.classifier)
    if int(config.pairs.resolution) != clf.input_size:
        raise ValueError(f"config.eval.classifier={config.eval.classifier} reads {clf.input_size}×{clf.input_size} "
                         f"images but the generator makes {config.pairs.resolution}×{config.pairs.resolution} "
                         "(config.pairs.resolution); unset config.eval.classifier or use one trained at that "
                         "resolution.")  # fmt: skip

    def annotate(images, prompts, who):
        fields = clf.attribute_fields(prompts, clf.run(images)[1])
        if who == "student":
            return fields
        return [{"teacher_predicted": f["predicted"], "teacher_predicted_prob": f["predicted_prob"]} for f in fields]

    annotate.classifier = {"folder": clf.folder, "identity": clf.identity}
    return annotate


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`--config.mode=sample`: PNGs + grid + samples.jsonl in `sample.out_dir` (default
    `<workdir>/samples/<export step>`, which must be new or empty); returns that folder."""
    s = config.sample
    prompts = sample_prompts(config)
    seeds = [int(s.seed) + i for i in range(len(prompts))]
    annotate = _classifier_annotate(config) if jax.process_index() == 0 else None
    teacher = wd.teacher_path(config, workdir)
    unet_dir = generator_unet(config, workdir)
    info = wd.read_export_info(unet_dir)
    tag = f"step_{int(info['step']):08d}" if "step" in info else os.path.basename(os.path.dirname(unet_dir))
    out = wd.sample_dir(config, workdir, tag)
    check_out_dir(out)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    batch = shd.round_batch(int(s.batch_size) or mesh.size, mesh)
    sampler = OneStepSampler.load(teacher, unet_dir, resolution=int(config.pairs.resolution), batch_size=batch,
                                  mesh=mesh, dtype=s.dtype or config.teacher.dtype,
                                  with_teacher=bool(s.teacher))  # fmt: skip
    teacher_ode = (float(config.pairs.guidance_scale), int(config.pairs.num_steps)) if s.teacher else None
    extra = {"unet": os.path.abspath(unet_dir), "teacher": os.path.abspath(teacher), "devices": mesh.size,
             "classifier": getattr(annotate, "classifier", None)}  # fmt: skip
    summary = write_samples(out, sampler, prompts, seeds, teacher_ode=teacher_ode, columns=int(s.grid_columns),
                            annotate=annotate, extra=extra)  # fmt: skip
    logging.info("sample: %d images → %s (%.2f images/s one-step after compile, batch %d on %d devices)",
                 len(prompts), out, summary["images_per_s"], batch, mesh.size)  # fmt: skip
    return out


def run_serve(config: ml_collections.ConfigDict, workdir: str, t0: float | None = None) -> None:
    """`--config.mode=serve`: the demo page for the student of `sample.unet` (or the latest export) with its teacher
    on the same noise, on http://<serve.host>:<serve.port>/ until Ctrl-C (d2g_jax/serve.py)."""
    from d2g_jax import serve

    if jax.process_count() > 1:
        raise ValueError("config.mode=serve runs on one host (one process); start it without jax.distributed.")
    s = config.serve
    teacher = wd.teacher_path(config, workdir)
    unet_dir = generator_unet(config, workdir)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    teacher_ode = (float(config.pairs.guidance_scale), int(config.pairs.num_steps)) if s.teacher else None
    engine = serve.load_engine(teacher, unet_dir, resolution=int(config.pairs.resolution),
                               max_images=int(s.max_images), mesh=mesh,
                               dtype=config.sample.dtype or config.teacher.dtype, teacher_ode=teacher_ode,
                               max_queue=int(s.queue))  # fmt: skip
    logging.info("serve: student %s, teacher %s", unet_dir, teacher)
    serve.serve(engine, str(s.host).strip(), int(s.port), t_start=t0)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--config.mode=eval` on the exported generator (or `eval.unet`; `eval.teacher` = the teacher's ODE;
    `eval.images` = a folder of captioned images instead of a generator)."""
    e = config.eval
    names = parse_metrics(e.metrics)
    uses_real = {"fid", "pr", "fd", "fd_pr"} & set(names)
    if e.images:
        folder = ImageFolder(e.images, e.prompt_field, int(e.images_num), int(e.seed))
        evaluator = Evaluator(config, workdir, len(folder), names, prompts=folder.captions)
        name = os.path.basename(os.path.normpath(e.images))
        tag = f"images_{name}_{e.real_name}_{len(folder)}" if uses_real else f"images_{name}_{len(folder)}"
        save_dir = os.path.join(wd.eval_dir(workdir), f"{tag}_images")
        results = evaluator.run_images(folder, save_dir=save_dir, save_num=min(int(e.save_images), len(folder)),
                                       sources=folder.files, batch_size=int(e.batch_size) or 64)  # fmt: skip
        extra = {"generator": f"images: {os.path.abspath(folder.manifest)}", "images": os.path.abspath(e.images),
                 "images_num": len(folder), **eval_extra(evaluator)}  # fmt: skip
        path = write_results(workdir, tag, 0, results, extra)
        logging.info("eval %s: %s → %s", tag, _metrics_line(results), path)
        return results
    teacher = wd.teacher_path(config, workdir)
    use_teacher = bool(e.teacher)
    # The teacher rows need no student: without eval.unet its own U-Net stands in (its params are not used).
    if use_teacher:
        unet_dir = e.unet or os.path.join(teacher, "unet")
    else:
        unet_dir = generator_unet(config, workdir, "eval.unet")
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    teacher_ode = (float(config.pairs.guidance_scale), int(config.pairs.num_steps))
    evaluator = Evaluator(config, workdir, int(e.num_images), names)
    evaluator.check_resolution(int(config.pairs.resolution), f"config.pairs.resolution={config.pairs.resolution}")
    sampler = OneStepSampler.load(teacher, unet_dir, resolution=int(config.pairs.resolution),
                                  batch_size=eval_batch(config, mesh), mesh=mesh,
                                  dtype=config.sample.dtype or config.teacher.dtype,
                                  with_teacher=use_teacher or evaluator.needs_teacher)  # fmt: skip
    info = wd.read_export_info(unet_dir)
    step = int(info.get("step", 0))
    if use_teacher:
        what = "teacher"
    elif "step" in info:
        what = f"step_{step:08d}"
    else:  # a plain diffusers U-Net folder (e.g. <teacher>/unet: the teacher's one-step x0 prediction)
        what = "unet_" + os.path.basename(os.path.dirname(os.path.abspath(unet_dir)))
    tag = f"{what}_{e.real_name}_{e.num_images}" if uses_real else f"{what}_{e.num_images}"
    save_dir = os.path.join(wd.eval_dir(workdir), f"{tag}_images")
    results = evaluator.run(sampler, use_teacher=use_teacher, teacher_ode=teacher_ode, save_dir=save_dir,
                            save_num=min(int(e.save_images), int(e.num_images)))  # fmt: skip
    extra = {"generator": "teacher ODE" if use_teacher else os.path.abspath(unet_dir),
             "teacher": os.path.abspath(teacher), "teacher_ode": {"guidance_scale": teacher_ode[0],
                                                                  "num_steps": teacher_ode[1]},
             "prompts": e.prompts, "resolution": int(config.pairs.resolution), **eval_extra(evaluator)}  # fmt: skip
    path = write_results(workdir, tag, step, results, extra)
    logging.info("eval %s: %s → %s", tag, _metrics_line(results), path)
    return results


class VerifyError(RuntimeError):
    """`--config.mode=verify` found damaged files."""


def run_verify(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, str]]:
    """`--config.mode=verify`: checks every checkpoint of both stages against its digest record, every export
    against the digests in its `export.json` and every pair shard record by record (its CRC-32s), and prints one
    table (verified / unverified = no record, an older run / damaged, with the file). Writes nothing. Raises
    `VerifyError` (exit status 1) naming each damaged item; returns the rows otherwise."""
    from d2g_jax.data.pairs_writer import PairsError, verify_shard
    from d2g_jax.train import integrity

    rows: list[dict[str, str]] = []

    def row(what: str, path: str, status: str, detail: str = "") -> None:
        rows.append({"what": what, "path": path, "status": status, "detail": detail})

    for stage in wd.STAGES:
        ck = wd.checkpoints_dir(workdir, stage)
        names = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
        for name in sorted((n for n in names if n.isdigit()), key=int):
            folder = os.path.join(ck, name)
            try:
                status = integrity.check_folder(folder)
                row(f"{stage} checkpoint {name}", folder, status, "" if status == integrity.VERIFIED else
                    "no digest record (older run, or killed between save and record)")  # fmt: skip
            except integrity.IntegrityError as e:
                row(f"{stage} checkpoint {name}", folder, integrity.DAMAGED, str(e))
        for name in (n for n in names if ".corrupt-" in n):
            row(f"{stage} checkpoint {name.split('.')[0]}", os.path.join(ck, name), "set aside",
                "moved aside by a restore; not used")  # fmt: skip
    root = wd.export_root(config, workdir)
    for step_dir in sorted(d for d in (os.path.join(root, n) for n in (os.listdir(root) if os.path.isdir(root) else []))
                           if os.path.basename(d).startswith("step_")):  # fmt: skip
        what = f"export {os.path.basename(step_dir)}"
        if not os.path.isfile(os.path.join(step_dir, wd.EXPORT_INFO)):
            row(what, step_dir, "incomplete", f"no {wd.EXPORT_INFO} (an export killed half-way; rerun export)")
            continue
        try:
            status = verify_export(os.path.join(step_dir, "unet"))
            row(what, step_dir, status, "" if status == integrity.VERIFIED else f"{wd.EXPORT_INFO} has no digests")
        except ExportError as e:
            row(what, step_dir, integrity.DAMAGED, str(e))
    pdir = wd.pairs_dir(config, workdir)
    try:
        manifest = read_manifest(pdir)
    except Exception as e:  # noqa: BLE001 - an unreadable manifest is damage
        manifest = None
        row("pairs manifest", pdir, integrity.DAMAGED, str(e))
    for shard in (manifest or {}).get("shards", []):
        path = os.path.join(pdir, shard["file"])
        what = f"pairs {shard['file']}"
        if not os.path.isfile(path):
            row(what, path, integrity.DAMAGED if manifest.get("complete") else "incomplete",
                "missing" + ("" if manifest.get("complete") else " (not generated yet)"))  # fmt: skip
            continue
        try:
            verify_shard(path, int(shard["start"]), int(shard["end"]), manifest["run_id"], full=True)
            row(what, path, integrity.VERIFIED, f"{int(shard['end']) - int(shard['start'])} records, CRC-32 each")
        except PairsError as e:
            row(what, path, integrity.DAMAGED, str(e))
    damaged = [r for r in rows if r["status"] == integrity.DAMAGED]
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    width = max([len(r["what"]) for r in rows] + [4])
    lines = [f"verify {workdir}: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing to verify")]
    lines += [f"  {r['what']:<{width}}  {r['status']:<10}  {r['detail'] or r['path']}" for r in rows]
    logging.info("%s", "\n".join(lines))
    if damaged:
        raise VerifyError(f"verify: {len(damaged)} damaged in {workdir}: "
                          + "; ".join(f"{r['what']}: {r['detail']}" for r in damaged))  # fmt: skip
    return rows


REPORT_COLUMNS = (("fd", "FD ↓", "{:.2f}"), ("fd_precision", "precision", "{:.3f}"), ("fd_recall", "recall", "{:.3f}"),
                  ("prompt_acc", "prompt acc", "{:.3f}"), ("prompt_acc_digit", "digit", "{:.3f}"),
                  ("prompt_acc_colour", "colour", "{:.3f}"), ("teacher_dist", "dist. to teacher", "{:.4f}"),
                  ("images_per_s", "images/s", "{:.1f}"))  # fmt: skip


def run_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
    """The closing comparison of a world run (`config.report.enabled`, configs/mnist.py): the same metrics for the
    real floor (`report.real`, train-split images scored as if generated), the teacher's ODE, the teacher's one-step
    x0 (what stage 1 starts from) and the student; a table in the log and `<workdir>/report/report.md|json`, and
    a grid of teacher rows over student rows on the same noise (`<workdir>/report/grid/grid.png`)."""
    r, e = config.report, config.eval
    teacher = wd.teacher_path(config, workdir)
    names = [m for m in parse_metrics(e.metrics)]
    fixed = [m for m in names if m not in ("teacher_dist", "dreamsim", "dreamdiv")]
    rows: dict[str, dict[str, Any]] = {}

    def evaluate(label: str, **fields) -> None:
        c = config.copy_and_resolve_references()
        with c.unlocked():
            for k, v in fields.items():
                c.eval[k] = v
        logging.info("report: %s", label)
        rows[label] = run_eval(c, workdir)

    want = {x.strip() for x in str(r.rows).split(",") if x.strip()}
    if r.real and "real" in want:
        evaluate("real (train split, as if generated)", images=r.real, images_num=int(e.num_images),
                 metrics=",".join(fixed))  # fmt: skip
    steps, cfg = int(config.pairs.num_steps), float(config.pairs.guidance_scale)
    if "teacher" in want:
        evaluate(f"teacher, {steps}-step DDIM, CFG {cfg:g}", teacher=True)
    if "teacher_x0" in want:
        evaluate("teacher, 1-step x0 (stage 1's start)", unet=os.path.join(teacher, "unet"))
    if "student" in want:
        evaluate("student, 1 step (export)")
    head = "| row | " + " | ".join(h for _, h, _ in REPORT_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(REPORT_COLUMNS) + 1)]
    for label, m in rows.items():
        cells = [f.format(float(m[k])) if isinstance(m.get(k), (int, float)) else "–" for k, _, f in REPORT_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = os.path.join(workdir, "report")
    grid = None
    if int(r.grid_images) > 0:
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.sample.num_prompts, c.sample.teacher = int(r.grid_images), True
            c.sample.out_dir = os.path.join(out, "grid")
        prompts = sample_prompts(c)
        seeds = [int(e.seed) + i for i in range(len(prompts))]
        mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
        sampler = OneStepSampler.load(teacher, generator_unet(config, workdir), resolution=int(config.pairs.resolution),
                                      batch_size=shd.round_batch(len(prompts), mesh), mesh=mesh,
                                      dtype=config.sample.dtype or config.teacher.dtype, with_teacher=True)  # fmt: skip
        if os.path.isdir(c.sample.out_dir):  # the report is rewritten as a whole on a rerun
            import shutil

            shutil.rmtree(c.sample.out_dir)
        write_samples(c.sample.out_dir, sampler, prompts, seeds, teacher_ode=(cfg, steps),
                      columns=int(config.sample.grid_columns), annotate=_classifier_annotate(config),
                      teacher_first=True)  # fmt: skip
        grid = os.path.join(c.sample.out_dir, "grid.png")
    if jax.process_index() == 0:
        from d2g_jax import files

        os.makedirs(out, exist_ok=True)
        files.atomic_write_json(os.path.join(out, "report.json"), rows)
        files.atomic_write_text(os.path.join(out, "report.md"), table + "\n" + (f"\ngrid: {grid}\n" if grid else ""))
        logging.info("report (%d images each; FD/precision/recall vs %s):\n%s%s", int(e.num_images), e.real, table,
                     f"\n  grid (teacher row over student row, same noise): {grid}" if grid else "")  # fmt: skip
    return rows


def _metrics_line(results: dict[str, Any]) -> str:
    keep = ("fid", "precision", "recall", "clip_score", "dreamsim", "dreamdiv", "fd", "fd_precision", "fd_recall",
            "prompt_acc", "teacher_dist")  # fmt: skip
    return " · ".join(f"{k} {float(results[k]):.4g}" for k in keep if k in results) or "(no metrics)"


# ------------------------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, config_file: str = "") -> None:
    """Runs `config.mode` ("all", one phase, a use mode, or verify) in `workdir`."""
    validate(config, workdir)
    if config.mode == "verify":  # reads the workdir only: no world, nothing written
        run_verify(config, workdir)
        return
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    if config.world.provider:
        config = resolve_world(config, workdir)
        validate(config, workdir)  # the fields the world filled
    mode = config.mode
    if mode == "sample":
        out = run_sample(config, workdir)
        _summary(config, workdir, config_file, t0, samples=out)
        return
    if mode == "eval":
        run_eval(config, workdir)
        _summary(config, workdir, config_file, t0)
        return
    if mode == "serve":
        run_serve(config, workdir, t0)
        return
    if mode in ("all", "pairs"):
        logging.info("=== pairs: teacher ODE (%d DDIM steps, CFG %g) → %s", int(config.pairs.num_steps),
                     float(config.pairs.guidance_scale), wd.pairs_dir(config, workdir))  # fmt: skip
        run_pairs(config, workdir)
    if mode in ("all", "train"):
        logging.info("=== train: %s", " → ".join(s for s in wd.STAGES if s != "stage2" or
                                                  wd.final_stage(config) == "stage2"))  # fmt: skip
        if not run_train(config, workdir):
            return
    unet_dir = None
    if mode in ("all", "export"):
        logging.info("=== export")
        unet_dir = run_export(config, workdir)
    if mode == "all" and config.report.enabled:
        logging.info("=== report")
        run_report(config, workdir)
    _summary(config, workdir, config_file, t0, unet_dir=unet_dir)


def _summary(config, workdir: str, config_file: str, t0: float, unet_dir: str | None = None,
             samples: str | None = None) -> None:  # fmt: skip
    """The closing lines: where things are, and the command that samples from the export."""
    if jax.process_index() != 0:
        return
    unet_dir = unet_dir or wd.latest_export(wd.export_root(config, workdir))
    lines = [f"done: mode={config.mode} in {console.fmt_seconds(time.perf_counter() - t0)} ({workdir})"]
    if unet_dir:
        lines.append(f"  export       {unet_dir}  (diffusers U-Net; export.json: T, α_T, σ_T, x0 formula)")
    for stage in wd.STAGES:
        d = wd.stage_dir(workdir, stage)
        if os.path.isdir(os.path.join(d, "samples")):
            lines.append(f"  {stage} grids {os.path.join(d, 'samples')}/  (teacher row over student row)")
        if os.path.isfile(os.path.join(d, "metrics.jsonl")):
            lines.append(f"  {stage} log   {os.path.join(d, 'metrics.jsonl')}")
    if samples:
        lines.append(f"  samples      {samples}/  (grid.png, samples.jsonl)")
    if os.path.isdir(wd.eval_dir(workdir)):
        lines.append(f"  eval         {wd.eval_dir(workdir)}/*.json")
    if os.path.isfile(os.path.join(workdir, "report", "report.md")):
        lines.append(f"  report       {os.path.join(workdir, 'report')}/  (report.md, grid/grid.png)")
    lines.append(f"  TensorBoard  tensorboard --logdir {workdir}")
    if unet_dir and config.mode != "sample":
        cfg = config_file or "<config>"
        lines.append(f"  next         python -m d2g_jax.main --config={cfg} --workdir={workdir} --config.mode=sample")
    logging.info("%s", "\n".join(lines))

