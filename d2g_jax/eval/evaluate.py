"""`--config.mode=eval`: the paper's metrics for the exported generator (or the teacher), and the small
periodic evaluation during training.

Paper §4 "Evaluation protocols" (following GigaGAN's evaluation code and clean-fid):
* FID: generated images (the pairs' resolution, 512 px for SD) and real images are center-cropped and resized to
  `eval.resolution` = 256 with PIL LANCZOS, then to 299 with clean-fid's bicubic, and go through clean-fid's
  Inception (`d2g_jax.eval.resize`, `extractors.InceptionExtractor`). The paper's text says "antialiased bicubic"
  for the 512→256 step; GigaGAN's code (which the paper follows) uses LANCZOS, and so do we.
  FID-30k: 30,000 COCO2014-val captions (one random caption of each of 30k random val images) vs the statistics
  of the 40,504 val images; FID-5k on COCO2017: the 5,000 val2017 images and one caption each.
* Precision & Recall (Kynkäänniemi et al., k = 3) on the first `eval.pr_num` (10k) generated and real features.
* CLIP score: GigaGAN's `compute_clip_score` — the 256-px image, "A photo depicts " + caption, cosine of the
  CLIP embeddings (the paper's model: OpenCLIP ViT-g-14), averaged.
* DreamSim-5k: DreamSim distance between the student's and the teacher's image (its ODE with the pairs' CFG
  scale and steps) for the same noise and caption, on the first `eval.dreamsim_num` captions.
* DreamDiv: `eval.dreamdiv_per_prompt` (8) images per caption for the first `eval.dreamdiv_prompts` captions,
  mean pairwise DreamSim distance within a caption, averaged over captions.

Outputs: `<workdir>/eval/<tag>.json`, tag = `step_<N>[_<real_name>]_<num_images>` (metrics, counts, the
generator, reference-statistics file, protocol) and the same scalars through clu (`<workdir>/eval/tb`,
TensorBoard), step = the export's training step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from d2g_jax.eval import metrics as M
from d2g_jax.eval import resize

METRICS = ("fid", "pr", "clip", "dreamsim", "dreamdiv")
DREAMDIV_SEED_OFFSET = 10_000_000  # DreamDiv's noises: seed + offset + p·K + k (disjoint from the FID noises)


def parse_metrics(spec: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in spec.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"config.eval.metrics={spec!r}: unknown {bad or 'empty'}; choose from {', '.join(METRICS)}.")
    return names


def coco_captions(path: str, num: int, seed: int) -> list[str]:
    """COCO `captions_*.json`: `num` images drawn without replacement (seeded), one random caption of each,
    in the drawn order; all images (each with one random caption) when `num` equals their count."""
    with open(path) as f:
        data = json.load(f)
    if "annotations" not in data:
        raise ValueError(f"{path}: no 'annotations' list; expected COCO captions_val2014.json / captions_val2017.json.")
    by_image: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    ids = sorted(by_image)
    if num > len(ids):
        raise ValueError(f"config.eval.num_images={num} but {path} has captions for {len(ids)} images.")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(ids))[:num]
    return [by_image[ids[i]][int(rng.integers(len(by_image[ids[i]])))] for i in chosen]


def eval_prompts(config: ml_collections.ConfigDict, num: int) -> list[str]:
    """`num` captions from `config.eval.prompts` (COCO json: see `coco_captions`; other prompt files: `num`
    drawn without replacement, seeded, in file order)."""
    from d2g_jax.data.prompts import read_prompts

    e = config.eval
    if not e.prompts and config.teacher.tiny:  # the tiny run's built-in captions
        from d2g_jax.pipeline import TINY_PROMPTS

        if num > len(TINY_PROMPTS):
            raise ValueError(f"config.eval.num_images={num}: the tiny run has {len(TINY_PROMPTS)} built-in captions.")
        return list(TINY_PROMPTS[:num])
    if not e.prompts:
        raise ValueError("config.eval.prompts is empty: give COCO's captions_val2014.json (FID-30k) or "
                         "captions_val2017.json (5k), or a .txt/.jsonl/.parquet/tfds: prompt list.")  # fmt: skip
    if e.prompts.endswith(".json") and os.path.isfile(e.prompts):
        try:  # one JSON document with COCO's "annotations" (a .json of one object per line is JSONL: read below)
            with open(e.prompts) as f:
                is_coco = "annotations" in json.load(f)
        except (json.JSONDecodeError, TypeError):
            is_coco = False
        if is_coco:
            return coco_captions(e.prompts, num, int(e.seed))
    prompts = read_prompts(e.prompts, field=e.prompt_field or None)
    if num > len(prompts):
        raise ValueError(f"config.eval.num_images={num} but {e.prompts} holds {len(prompts)} prompts.")
    idx = np.sort(np.random.default_rng(int(e.seed)).permutation(len(prompts))[:num])
    return [prompts[i] for i in idx]


class Extractors:
    """The feature extractors the requested metrics need, from config paths (or random files for smoke runs)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, names: Sequence[str]):
        from d2g_jax.eval import extractors as X

        e = config.eval
        paths = {"inception": e.inception, "clip": e.clip, "dreamsim": e.dreamsim}
        if e.random_extractors:
            paths = _random_extractor_files(os.path.join(workdir, "eval", "random_extractors"), e.dreamsim_type)
            logging.warning("eval: RANDOM-WEIGHT feature extractors (config.eval.random_extractors): the numbers are "
                            "a smoke test and mean nothing.")  # fmt: skip
        self.inception = X.InceptionExtractor(paths["inception"]) if {"fid", "pr"} & set(names) else None
        self.clip = X.ClipScorer(paths["clip"]) if "clip" in names else None
        need_ds = {"dreamsim", "dreamdiv"} & set(names)
        self.dreamsim = X.DreamSimEmbedder(paths["dreamsim"], e.dreamsim_type) if need_ds else None


def _random_extractor_files(folder: str, dreamsim_type: str) -> dict[str, str]:
    import shutil

    from d2g_jax.eval import random_extractors as R

    out = {"inception": os.path.join(folder, "inception"), "clip": os.path.join(folder, "clip"),
           "dreamsim": os.path.join(folder, f"dreamsim_{dreamsim_type}")}  # fmt: skip
    writers = {"inception": R.write_random_inception, "clip": R.write_random_clip,
               "dreamsim": lambda p: R.write_random_dreamsim(p, dreamsim_type)}  # fmt: skip
    # Only process 0 computes features (see Evaluator), so only it writes and reads these files. Each folder is
    # written under a temporary name and renamed when complete, so a killed run never leaves a half-written one.
    for name, path in out.items():
        if not os.path.isdir(path):
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            writers[name](tmp)
            os.replace(tmp, path)
    return out


class Evaluator:
    """Computes the metrics for images from `images_fn(noise, prompts) -> uint8 [B, H, W, 3]`.

    Built once (extractors, captions, reference statistics) and reused: the eval mode calls it on the exported
    generator; the trainer calls it every `eval.every` steps with the EMA generator on `eval.subset` images.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, num_images: int,
                 names: Sequence[str] | None = None):  # fmt: skip
        e = config.eval
        self.config, self.workdir = config, workdir
        self.names = tuple(names) if names is not None else parse_metrics(e.metrics)
        self.num = int(num_images)
        if self.num < 1:
            raise ValueError(f"evaluation needs at least one image (config.eval.num_images / subset = {self.num}).")
        self.res = int(e.resolution)
        self.is_main = jax.process_index() == 0
        self.prompts = eval_prompts(config, self.num)
        self.seeds = [int(e.seed) + i for i in range(self.num)]
        self.ex = Extractors(config, workdir, self.names) if self.is_main else None
        self.ref = None
        if self.is_main and {"fid", "pr"} & set(self.names):
            from d2g_jax.eval.reference import reference_stats

            if not e.real:
                raise ValueError("config.eval.real is empty: FID / Precision & Recall need the real images (a folder, "
                                 "e.g. COCO val2014/, or tfds:NAME:SPLIT[:FEATURE]); or drop fid,pr from "
                                 "config.eval.metrics.")  # fmt: skip
            keep = int(e.pr_num) if "pr" in self.names else 0
            self.ref = reference_stats(e.real, name=e.real_name, num=int(e.num_real), eval_res=self.res,
                                       extractor=self.ex.inception, keep_feats=keep,
                                       cache_dir=e.stats_dir or os.path.join(workdir, "eval", "reference"))  # fmt: skip

    def run(self, sampler, *, use_teacher: bool = False, teacher_ode: tuple[float, int] | None = None,
            save_dir: str = "", save_num: int = 0) -> dict:  # fmt: skip
        """Metrics of `sampler` (a `d2g_jax.generate.OneStepSampler`); `use_teacher` evaluates the teacher's ODE
        images instead (the paper's teacher rows); `teacher_ode` = (CFG scale, steps) for the teacher. The first
        `save_num` generated images are written to `save_dir` as `<i:05d>.png` (+ `captions.txt` and their
        Inception features, `inception_features.npz`)."""
        from d2g_jax.generate import noise_for_seeds

        e = self.config.eval
        names = set(self.names)
        if ("dreamsim" in names or use_teacher) and teacher_ode is None:
            raise ValueError("DreamSim-5k and teacher evaluation need the teacher ODE (CFG scale, steps).")
        gen = (lambda z, p: sampler.teacher_images(z, p, *teacher_ode)) if use_teacher else sampler.images
        t0 = time.perf_counter()
        feats, clip_scores, ds = [], [], []
        n_ds = min(int(e.dreamsim_num), self.num) if "dreamsim" in names else 0
        bs = sampler.batch_size
        for start in range(0, self.num, bs):
            p = self.prompts[start : start + bs]
            z = noise_for_seeds(self.seeds[start : start + bs], sampler.latent_shape)
            img = gen(z, p)
            if start < n_ds:  # the student vs the teacher on the same noise (0 when evaluating the teacher)
                k = min(len(p), n_ds - start)
                ref = img[:k] if use_teacher else sampler.teacher_images(z[:k], p[:k], *teacher_ode)
                if self.is_main:
                    ds.append(self.ex.dreamsim.distance(img[:k], ref))
            if not self.is_main:
                continue
            if start < save_num:
                _save_pngs(save_dir, img[: save_num - start], start)
            if {"fid", "pr"} & names:
                feats.append(self.ex.inception(resize.batch_fid_input(img, self.res)))
            if "clip" in names:
                small = np.stack([resize.gigagan_resize(x, self.res) for x in img])
                clip_scores.append(self.ex.clip.scores(small, p))
            if (start // bs) % 20 == 0:
                logging.info("eval: %d / %d images (%.1f s)", start + len(p), self.num, time.perf_counter() - t0)
        out: dict[str, Any] = {"num_images": self.num, "generation_s": time.perf_counter() - t0}
        if self.is_main and save_num:
            with open(os.path.join(save_dir, "captions.txt"), "w") as f:
                f.writelines(p.replace("\n", " ") + "\n" for p in self.prompts[:save_num])
        if "dreamdiv" in names:
            out.update(self._dreamdiv(gen, sampler))
        if not self.is_main:
            return out
        if feats:
            f = np.concatenate(feats)
            if save_num:  # the Inception features of the saved images (to recompute FID against other references)
                np.savez(os.path.join(save_dir, "inception_features.npz"), feats=f[:save_num])
            mu, sigma = M.feature_stats(f)
            if "fid" in names:
                out["fid"] = M.fid_from_stats((mu, sigma), (self.ref["mu"], self.ref["sigma"]))
                out["fid_num_real"] = int(self.ref["meta"].get("count", self.ref["meta"]["num"]))
            if "pr" in names:
                n = min(int(e.pr_num), len(f), len(self.ref["feats"]))
                out["precision"], out["recall"] = M.precision_recall(self.ref["feats"][:n], f[:n], k=int(e.pr_k))
                out["pr_num"] = n
        if clip_scores:
            out["clip_score"] = float(np.mean(np.concatenate(clip_scores)))
        if ds:
            out["dreamsim"] = float(np.mean(np.concatenate(ds)))
            out["dreamsim_num"] = n_ds
        out["eval_s"] = time.perf_counter() - t0
        return out

    def _dreamdiv(self, gen: Callable, sampler) -> dict[str, Any]:
        from d2g_jax.generate import noise_for_seeds

        e = self.config.eval
        k = int(e.dreamdiv_per_prompt)
        n_p = min(int(e.dreamdiv_prompts), self.num)
        if k < 2:
            raise ValueError(f"config.eval.dreamdiv_per_prompt={k}: DreamDiv needs at least 2 images per prompt.")
        prompts = [p for p in self.prompts[:n_p] for _ in range(k)]
        seeds = [int(e.seed) + DREAMDIV_SEED_OFFSET + i for i in range(len(prompts))]
        emb = []
        for start in range(0, len(prompts), sampler.batch_size):
            sl = slice(start, start + sampler.batch_size)
            img = gen(noise_for_seeds(seeds[sl], sampler.latent_shape), prompts[sl])
            if self.is_main:
                emb.append(self.ex.dreamsim.embed(img))
        if not self.is_main:
            return {}
        e_all = np.concatenate(emb)
        return {"dreamdiv": M.dreamdiv(e_all.reshape(n_p, k, -1)), "dreamdiv_prompts": n_p, "dreamdiv_per_prompt": k}


def _save_pngs(folder: str, images: np.ndarray, start: int) -> None:
    from d2g_jax.train.trainer import write_png

    os.makedirs(folder, exist_ok=True)
    for j, im in enumerate(images):
        write_png(os.path.join(folder, f"{start + j:05d}.png"), im)


def write_results(workdir: str, tag: str, step: int, results: dict[str, Any], extra: dict[str, Any]) -> str:
    """`<workdir>/eval/<tag>.json` + clu scalars (`<workdir>/eval/tb`, `eval/<metric>`) at `step`."""
    from clu import metric_writers

    out_dir = os.path.join(workdir, "eval")
    path = os.path.join(out_dir, f"{tag}.json")
    if jax.process_index() != 0:
        return path
    os.makedirs(out_dir, exist_ok=True)
    summary = {"step": step, **extra, "metrics": results}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, default=float)
    os.replace(tmp, path)
    writer = metric_writers.create_default_writer(os.path.join(out_dir, "tb"), just_logging=False)
    scalars = {f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    writer.write_scalars(step, scalars)
    writer.flush()
    writer.close()
    return path


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--config.mode=eval` on the exported generator (or `eval.unet`; `eval.teacher` = the teacher's ODE)."""
    from d2g_jax import pipeline
    from d2g_jax import sharding as shd
    from d2g_jax.generate import OneStepSampler, generator_unet, read_export_info

    e = config.eval
    names = parse_metrics(e.metrics)
    teacher = pipeline.teacher_path(config, workdir)
    unet_dir = generator_unet(config, workdir, "eval.unet")
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    batch = int(e.batch_size) or int(config.sample.batch_size) or mesh.size
    batch = math.ceil(batch / mesh.size) * mesh.size
    use_teacher = bool(e.teacher)
    teacher_ode = (float(config.pairs.guidance_scale), int(config.pairs.num_steps))
    evaluator = Evaluator(config, workdir, int(e.num_images), names)
    sampler = OneStepSampler.load(teacher, unet_dir, resolution=int(config.pairs.resolution), batch_size=batch,
                                  mesh=mesh, dtype=config.sample.dtype or config.teacher.dtype,
                                  with_teacher=use_teacher or "dreamsim" in names)  # fmt: skip
    info = read_export_info(unet_dir)
    step = int(info.get("step", 0))
    what = "teacher" if use_teacher else f"step_{step:08d}"
    tag = f"{what}_{e.real_name}_{e.num_images}" if {"fid", "pr"} & set(names) else f"{what}_{e.num_images}"
    save_dir = os.path.join(workdir, "eval", f"{tag}_images")
    results = evaluator.run(sampler, use_teacher=use_teacher, teacher_ode=teacher_ode, save_dir=save_dir,
                            save_num=min(int(e.save_images), int(e.num_images)))  # fmt: skip
    extra = {"generator": "teacher ODE" if use_teacher else os.path.abspath(unet_dir),
             "teacher": os.path.abspath(teacher), "teacher_ode": {"guidance_scale": teacher_ode[0],
                                                                  "num_steps": teacher_ode[1]},
             "prompts": e.prompts, "resolution": int(config.pairs.resolution), "eval_resolution": int(e.resolution),
             "protocol": "GigaGAN evaluation code + clean-fid: center crop, PIL LANCZOS to eval_resolution, "
                         "clean-fid bicubic to 299, clean-fid Inception; CLIP score as GigaGAN (\"A photo depicts\")",
             "reference": evaluator.ref["meta"] if evaluator.ref else None,
             "random_extractors": bool(e.random_extractors)}  # fmt: skip
    path = write_results(workdir, tag, step, results, extra)
    logging.info("eval: %s → %s", {k: v for k, v in results.items()}, path)
    return results
