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

Attribute-classifier metrics (`eval.classifier` = a folder of `d2g_jax.eval.attributes`; for worlds of small images
with named attributes, where Inception/CLIP/DreamSim mean nothing). The classifier sees every image, real and
generated, at its native resolution (its `input_size`; no GigaGAN crop/resize, a generator at another resolution is
refused):
* `fd`: Fréchet distance (the FID code above) between the classifier's penultimate features of the generated
  images and of the real images `eval.real` (cached reference statistics, keyed by the classifier's content).
* `fd_pr`: precision & recall (k = `eval.pr_k`, on the first `eval.pr_num` features) on the same features.
* `prompt_acc`: share of images whose predicted class of every attribute is the one its prompt names (prompts
  parsed with the classifier's own vocabulary; prompts that do not name exactly one class of every attribute are
  left out and counted), plus `prompt_acc_<attribute>` per attribute.
* `teacher_dist`: the DreamSim-5k analogue on the first `eval.teacher_dist_num` images: 1 − cos of the classifier
  features of the student's and the teacher's (ODE) image for the same noise and prompt; `teacher_dist_pixel`: their
  RMS pixel difference (pixels / 255). 0 when the teacher is evaluated.

`eval.images=<folder>` evaluates a folder of images with captions instead of a generator (e.g. real images scored
as if generated: the floor of every metric); see `ImageFolder`.

Outputs: `<workdir>/eval/<tag>.json`, tag = `step_<N>[_<real_name>]_<num_images>` (`teacher_…` for the teacher,
`unet_<folder>_…` for a U-Net folder without export.json, `images_<folder>_…` for `eval.images`) with the metrics,
counts, the generator, reference statistics and protocol, and the same scalars through clu (`<workdir>/eval/tb`,
TensorBoard), step = the export's training step. Saved images (`eval.save_images`) come with `samples.jsonl`
(index, seed, prompt, file; with a classifier the prompt's parsed attributes and the predicted ones).
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

from d2g_jax import files
from d2g_jax.data.prompts import read_prompts
from d2g_jax.eval import metrics as M
from d2g_jax.eval import resize
from d2g_jax.eval.reference import reference_stats
from d2g_jax.generate import noise_for_seeds
from d2g_jax.workdir import TINY_PROMPTS

METRICS = ("fid", "pr", "clip", "dreamsim", "dreamdiv", "fd", "fd_pr", "prompt_acc", "teacher_dist")
CLASSIFIER_METRICS = ("fd", "fd_pr", "prompt_acc", "teacher_dist")  # need config.eval.classifier
TEACHER_METRICS = ("dreamsim", "teacher_dist")  # compare with the teacher's ODE image for the same noise
NOT_FOR_IMAGES = ("dreamsim", "dreamdiv", "teacher_dist")  # need a generator (noise, teacher): not eval.images
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
    e = config.eval
    if not e.prompts and config.teacher.tiny:  # the tiny run's built-in captions
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
        self.classifier = None  # also loaded without its metrics: saved images record its predictions
        if e.classifier or set(CLASSIFIER_METRICS) & set(names):
            from d2g_jax.eval.attributes import load_classifier

            self.classifier = load_classifier(e.classifier)


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
    `prompts` replaces the captions of `config.eval.prompts` (e.g. an image folder's own, `run_images`).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, num_images: int,
                 names: Sequence[str] | None = None, prompts: Sequence[str] | None = None):  # fmt: skip
        e = config.eval
        self.config, self.workdir = config, workdir
        self.names = tuple(names) if names is not None else parse_metrics(e.metrics)
        self.num = int(num_images)
        if self.num < 1:
            raise ValueError(f"evaluation needs at least one image (config.eval.num_images / subset = {self.num}).")
        self.res = int(e.resolution)
        self.is_main = jax.process_index() == 0
        self.prompts = list(prompts) if prompts is not None else eval_prompts(config, self.num)
        if len(self.prompts) != self.num:
            raise ValueError(f"{len(self.prompts)} prompts for {self.num} images.")
        self.seeds = [int(e.seed) + i for i in range(self.num)]
        self.ex = Extractors(config, workdir, self.names) if self.is_main else None
        self.ref = self.cls_ref = None
        names = set(self.names)
        if self.is_main and {"fid", "pr", "fd", "fd_pr"} & names:

            if not e.real:
                raise ValueError("config.eval.real is empty: FID / Precision & Recall (and fd / fd_pr) need the real "
                                 "images (a folder, e.g. COCO val2014/, or tfds:NAME:SPLIT[:FEATURE]); or drop "
                                 f"{', '.join(sorted(names & {'fid', 'pr', 'fd', 'fd_pr'}))} from "
                                 "config.eval.metrics.")  # fmt: skip
            cache = e.stats_dir or os.path.join(workdir, "eval", "reference")
            if {"fid", "pr"} & names:
                keep = int(e.pr_num) if "pr" in names else 0
                self.ref = reference_stats(e.real, name=e.real_name, num=int(e.num_real), eval_res=self.res,
                                           extractor=self.ex.inception, keep_feats=keep, cache_dir=cache)  # fmt: skip
            if {"fd", "fd_pr"} & names:
                clf = self.ex.classifier
                keep = int(e.pr_num) if "fd_pr" in names else 0
                self.cls_ref = reference_stats(e.real, name=e.real_name, num=int(e.num_real),
                                               eval_res=clf.input_size, extractor=clf, keep_feats=keep,
                                               cache_dir=cache, native=True)  # fmt: skip
        self.classifier = self.ex.classifier if self.is_main else None
        self.parsed = [self.classifier.parse(p) for p in self.prompts] if self.classifier else None

    @property
    def needs_teacher(self) -> bool:
        """Whether the metrics compare with the teacher's ODE images (DreamSim, teacher_dist)."""
        return bool(set(TEACHER_METRICS) & set(self.names))

    def check_resolution(self, side: int, what: str) -> None:
        """Refuses a generator whose images the attribute classifier cannot read at their native resolution."""
        if self.classifier is not None and side != self.classifier.input_size:
            raise ValueError(f"{what} makes {side}×{side} images but the attribute classifier "
                             f"{self.classifier.folder} (config.eval.classifier) takes "
                             f"{self.classifier.input_size}×{self.classifier.input_size} at the native resolution "
                             "(no resize); use a classifier trained at the generator's resolution.")  # fmt: skip

    def run(self, sampler, *, use_teacher: bool = False, teacher_ode: tuple[float, int] | None = None,
            save_dir: str = "", save_num: int = 0) -> dict:  # fmt: skip
        """Metrics of `sampler` (a `d2g_jax.generate.OneStepSampler`); `use_teacher` evaluates the teacher's ODE
        images instead (the paper's teacher rows); `teacher_ode` = (CFG scale, steps) for the teacher. The first
        `save_num` generated images are written to `save_dir` as `<i:05d>.png` (+ `captions.txt`,
        `samples.jsonl` and their features: `inception_features.npz`, `classifier_features.npz`)."""
        names = set(self.names)
        if (self.needs_teacher or use_teacher) and teacher_ode is None:
            raise ValueError("DreamSim-5k, teacher_dist and teacher evaluation need the teacher ODE (CFG scale, "
                             "steps).")  # fmt: skip
        gen = (lambda z, p: sampler.teacher_images(z, p, *teacher_ode)) if use_teacher else sampler.images
        t0 = time.perf_counter()
        col = _Collector(self, save_dir, save_num, t0)
        n_teacher = max(col.n_ds, col.n_td)
        # the teacher's own row writes the cache its images are (the later rows' teacher_dist then runs no ODE)
        cache = self._teacher_cache(sampler, teacher_ode, n_teacher) if n_teacher else None
        have = bool(cache) and os.path.isfile(cache)
        cached = np.load(cache)["images"] if have and not use_teacher else None
        made = []
        bs = sampler.batch_size
        gen_s, gen_n = 0.0, 0  # generation time after the first (compiling) batch
        for start in range(0, self.num, bs):
            p = self.prompts[start : start + bs]
            z = noise_for_seeds(self.seeds[start : start + bs], sampler.latent_shape)
            t_gen = time.perf_counter()
            img = gen(z, p)
            if start:
                gen_s, gen_n = gen_s + time.perf_counter() - t_gen, gen_n + len(p)
            ref = None
            if start < n_teacher:  # the student vs the teacher on the same noise (itself when evaluating the teacher)
                k = min(len(p), n_teacher - start)
                if use_teacher:
                    ref = img[:k]
                    made.append(ref)
                elif cached is not None:
                    ref = cached[start : start + k]
                else:
                    ref = sampler.teacher_images(z[:k], p[:k], *teacher_ode)
                    made.append(ref)
            if self.is_main:
                col.add(img, start, teacher=ref, seeds=self.seeds[start : start + bs])
        if cache and not have and made and self.is_main:
            from d2g_jax import files

            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = cache + ".tmp.npz"
            np.savez(tmp, images=np.concatenate(made))
            os.replace(tmp, cache)
            files.atomic_write_json(cache[: -len(".npz")] + ".json", {"teacher_ode": list(teacher_ode),
                                                                     "num": n_teacher, "seed": int(self.seeds[0])})
        out: dict[str, Any] = {"num_images": self.num, "generation_s": time.perf_counter() - t0}
        if gen_n:
            out["images_per_s"] = gen_n / gen_s  # after compile: batches 2…n of `generate` (prompts → uint8 images)
        if "dreamdiv" in names:
            out.update(self._dreamdiv(gen, sampler))
        if not self.is_main:
            return out
        out.update(col.finish())
        return out

    def _teacher_cache(self, sampler, teacher_ode, n: int) -> str | None:
        """The file caching the teacher's ODE images of the first `n` (prompt, seed) pairs for teacher_dist /
        DreamSim (`<eval.stats_dir>/teacher_images/` or `<workdir>/eval/teacher_images/`, `teacher_images_<key>.npz`,
        beside, not among, the reference statistics): the key hashes the teacher's
        fingerprint and dtype, the ODE, the latent shape, the prompts and the seeds, so every checkpoint evaluated
        against one teacher reuses one ODE run. Single-process runs only (hosts need not share a filesystem)."""
        key = getattr(sampler, "teacher_key", "")
        if not key or jax.process_count() > 1:
            return None
        import hashlib
        import json

        blob = json.dumps({"teacher": key, "ode": list(teacher_ode), "shape": list(sampler.latent_shape),
                           "prompts": self.prompts[:n], "seeds": self.seeds[:n]}, sort_keys=True)  # fmt: skip
        digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
        e = self.config.eval
        folder = os.path.join(e.stats_dir, "teacher_images") if e.stats_dir else os.path.join(self.workdir, "eval",
                                                                                               "teacher_images")
        return os.path.join(folder, f"teacher_images_{digest}.npz")

    def run_images(self, images, *, save_dir: str = "", save_num: int = 0,
                   sources: Sequence[str] | None = None, batch_size: int = 64) -> dict:  # fmt: skip
        """Metrics of given images (uint8 [N, H, W, 3], or an `ImageFolder`) with this evaluator's prompts, scored
        exactly as generated ones (e.g. real images: the floor of every metric). `sources`: each image's file,
        recorded in the saved `samples.jsonl`."""
        bad = sorted(set(NOT_FOR_IMAGES) & set(self.names))
        if bad:
            raise ValueError(f"config.eval.metrics has {', '.join(bad)}: images without a generator have no noise, "
                             "teacher image or second sample to compare with; drop them when evaluating "
                             "config.eval.images.")  # fmt: skip
        if len(images) != self.num:
            raise ValueError(f"{len(images)} images for {self.num} prompts.")
        t0 = time.perf_counter()
        out: dict[str, Any] = {"num_images": self.num}
        if not self.is_main:
            return out
        col = _Collector(self, save_dir, save_num, t0, sources=sources)
        for start in range(0, self.num, batch_size):
            col.add(np.asarray(images[start : start + batch_size]), start)
        out.update(col.finish())
        return out

    def _dreamdiv(self, gen: Callable, sampler) -> dict[str, Any]:
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


class _Collector:
    """Per-batch features and scores of one evaluation (process 0 only), turned into metrics by `finish`."""

    def __init__(self, ev: Evaluator, save_dir: str, save_num: int, t0: float, sources: Sequence[str] | None = None):
        e = ev.config.eval
        self.ev, self.names = ev, set(ev.names)
        self.save_dir, self.save_num, self.t0, self.sources = save_dir, int(save_num), t0, sources
        self.n_ds = min(int(e.dreamsim_num), ev.num) if "dreamsim" in self.names else 0
        self.n_td = min(int(e.teacher_dist_num), ev.num) if "teacher_dist" in self.names else 0
        self.feats, self.clip, self.ds = [], [], []
        self.cfeats, self.cpred, self.td, self.td_pix = [], [], [], []
        self.records: list[dict] = []
        self.batches = 0
        self.keep_cfeats = bool({"fd", "fd_pr"} & self.names) or (self.save_num > 0 and ev.classifier is not None)

    def add(self, img: np.ndarray, start: int, *, teacher: np.ndarray | None = None,
            seeds: Sequence[int] | None = None) -> None:  # fmt: skip
        ev, names = self.ev, self.names
        n = len(img)
        p = ev.prompts[start : start + n]
        if teacher is not None and start < self.n_ds:
            k = min(n, self.n_ds - start)
            self.ds.append(ev.ex.dreamsim.distance(img[:k], teacher[:k]))
        if {"fid", "pr"} & names:
            self.feats.append(ev.ex.inception(resize.batch_fid_input(img, ev.res)))
        if "clip" in names:
            small = np.stack([resize.gigagan_resize(x, ev.res) for x in img])
            self.clip.append(ev.ex.clip.scores(small, p))
        clf = ev.classifier
        probs = None
        if clf is not None:
            f, probs = clf.run(img, "generated images")
            if self.keep_cfeats:
                self.cfeats.append(f)
            self.cpred.append({a: np.argmax(q, -1) for a, q in probs.items()})
            if teacher is not None and start < self.n_td:
                k = min(n, self.n_td - start)
                self.td.append(M.cosine_distance(f[:k], clf(teacher[:k])))
                self.td_pix.append(M.pixel_rmse(img[:k], teacher[:k]))
        if start < self.save_num:
            k = min(n, self.save_num - start)
            _save_pngs(self.save_dir, img[:k], start)
            fields = clf.attribute_fields(p[:k], {a: q[:k] for a, q in probs.items()}) if clf else [{}] * k
            for j in range(k):
                i = start + j
                rec = {"index": i}
                if seeds is not None:
                    rec["seed"] = int(seeds[j])
                rec.update(prompt=p[j], file=f"{i:05d}.png")
                if self.sources is not None:
                    rec["source_file"] = self.sources[i]
                rec.update(fields[j])
                self.records.append(rec)
        if self.batches % 20 == 0 or start + n == ev.num:
            logging.info("eval: %d / %d images (%.1f s)", start + n, ev.num, time.perf_counter() - self.t0)
        self.batches += 1

    def finish(self) -> dict[str, Any]:
        ev, names = self.ev, self.names
        e = ev.config.eval
        out: dict[str, Any] = {}
        if self.save_num:
            with open(os.path.join(self.save_dir, "captions.txt"), "w") as f:
                f.writelines(p.replace("\n", " ") + "\n" for p in ev.prompts[: self.save_num])
            files.atomic_write_text(os.path.join(self.save_dir, "samples.jsonl"),
                                    "".join(json.dumps(r) + "\n" for r in self.records))
        if self.feats:
            f = np.concatenate(self.feats)
            if self.save_num:  # the Inception features of the saved images (to recompute FID against other references)
                np.savez(os.path.join(self.save_dir, "inception_features.npz"), feats=f[: self.save_num])
            mu, sigma = M.feature_stats(f)
            if "fid" in names:
                out["fid"] = M.fid_from_stats((mu, sigma), (ev.ref["mu"], ev.ref["sigma"]))
                out["fid_num_real"] = int(ev.ref["meta"].get("count", ev.ref["meta"]["num"]))
            if "pr" in names:
                n = min(int(e.pr_num), len(f), len(ev.ref["feats"]))
                out["precision"], out["recall"] = M.precision_recall(ev.ref["feats"][:n], f[:n], k=int(e.pr_k))
                out["pr_num"] = n
        if self.clip:
            out["clip_score"] = float(np.mean(np.concatenate(self.clip)))
        if self.ds:
            out["dreamsim"] = float(np.mean(np.concatenate(self.ds)))
            out["dreamsim_num"] = self.n_ds
        if self.cfeats:
            cf = np.concatenate(self.cfeats)
            if self.save_num:  # the classifier features of the saved images (to recompute fd with other references)
                np.savez(os.path.join(self.save_dir, "classifier_features.npz"), feats=cf[: self.save_num])
            if "fd" in names:
                out["fd"] = M.fid_from_stats(M.feature_stats(cf), (ev.cls_ref["mu"], ev.cls_ref["sigma"]))
                out["fd_num_real"] = int(ev.cls_ref["meta"].get("count", ev.cls_ref["meta"]["num"]))
            if "fd_pr" in names:
                n = min(int(e.pr_num), len(cf), len(ev.cls_ref["feats"]))
                out["fd_precision"], out["fd_recall"] = M.precision_recall(ev.cls_ref["feats"][:n], cf[:n],
                                                                           k=int(e.pr_k))  # fmt: skip
                out["fd_pr_num"] = n
        if "prompt_acc" in names:
            pred = {a: np.concatenate([c[a] for c in self.cpred]) for a in ev.classifier.names}
            out.update(M.prompt_accuracy(ev.parsed, pred))
        if self.td:
            out["teacher_dist"] = float(np.mean(np.concatenate(self.td)))
            out["teacher_dist_pixel"] = float(np.mean(np.concatenate(self.td_pix)))
            out["teacher_dist_num"] = self.n_td
        out["eval_s"] = time.perf_counter() - self.t0
        return out


def _save_pngs(folder: str, images: np.ndarray, start: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for j, im in enumerate(images):
        files.write_png(os.path.join(folder, f"{start + j:05d}.png"), im)


class ImageFolder:
    """A folder of images with captions (`eval.images`): `<folder>/captions.jsonl` (d2g_jax's dataset format) or,
    if absent, `<folder>/samples.jsonl` (the sample mode's / a saved evaluation's): one JSON object per line with
    the image's path relative to the folder under "file" and its caption under `field` (default: the first of
    "caption", "prompt", "text"). The images come in a seeded random order (`seed`), as a generator's prompts do —
    a folder sorted by class would otherwise bias the first-`pr_num` precision/recall and the saved images — and
    `num` > 0 keeps the first `num` of that order (else all). Indexing a slice reads those images (uint8
    [n, H, W, 3])."""

    MANIFESTS = ("captions.jsonl", "samples.jsonl")

    def __init__(self, folder: str, field: str = "", num: int = 0, seed: int = 0):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"config.eval.images={folder}: not a folder. Give a folder with images and "
                                    f"{' or '.join(self.MANIFESTS)} (one {{\"file\", \"caption\"}} per "
                                    "line).")  # fmt: skip
        manifest = next((os.path.join(folder, m) for m in self.MANIFESTS if os.path.isfile(os.path.join(folder, m))),
                        None)  # fmt: skip
        if manifest is None:
            raise FileNotFoundError(f"config.eval.images={folder}: no {' or '.join(self.MANIFESTS)} there (one JSON "
                                    "object per line with the image's \"file\" and its \"caption\").")  # fmt: skip
        files, captions = [], []
        with open(manifest) as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{manifest}:{ln}: not JSON ({err}).") from err
                keys = [field] if field else [k for k in ("caption", "prompt", "text") if k in rec][:1]
                if not isinstance(rec, dict) or "file" not in rec or not keys or keys[0] not in rec:
                    want = repr(field) if field else "'caption', 'prompt' or 'text'"
                    got = sorted(rec) if isinstance(rec, dict) else rec
                    raise ValueError(f"{manifest}:{ln}: needs a 'file' and a caption ({want}; "
                                     f"config.eval.prompt_field names another key); got {got!r}.")  # fmt: skip
                path = os.path.join(folder, str(rec["file"]))
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{manifest}:{ln}: image {path} does not exist.")
                files.append(path)
                captions.append(str(rec[keys[0]]))
        if not files:
            raise ValueError(f"{manifest}: no images listed.")
        if num > len(files):
            raise ValueError(f"config.eval.images_num={num} but {manifest} lists {len(files)} images.")
        idx = np.random.default_rng(seed).permutation(len(files))[: num or len(files)]
        files, captions = [files[i] for i in idx], [captions[i] for i in idx]
        self.folder, self.manifest, self.files, self.captions = folder, manifest, files, captions

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, sl: slice) -> np.ndarray:
        from d2g_jax.eval.reference import _read_rgb

        imgs = [_read_rgb(p) for p in self.files[sl]]
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise ValueError(f"{self.folder}: images of different sizes {sorted(shapes)} (e.g. {self.files[sl][0]}); "
                             "config.eval.images needs images of one size, as a generator makes.")  # fmt: skip
        return np.stack(imgs)


def write_results(workdir: str, tag: str, step: int, results: dict[str, Any], extra: dict[str, Any]) -> str:
    """`<workdir>/eval/<tag>.json` + clu scalars (`<workdir>/eval/tb`, `eval/<metric>`) at `step`."""
    from clu import metric_writers

    out_dir = os.path.join(workdir, "eval")
    path = os.path.join(out_dir, f"{tag}.json")
    if jax.process_index() != 0:
        return path
    os.makedirs(out_dir, exist_ok=True)
    files.atomic_write_json(path, {"step": step, **extra, "metrics": results})
    writer = metric_writers.create_default_writer(os.path.join(out_dir, "tb"), just_logging=False)
    scalars = {f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    writer.write_scalars(step, scalars)
    writer.flush()
    writer.close()
    return path


def eval_extra(evaluator: Evaluator) -> dict[str, Any]:
    e = evaluator.config.eval
    clf = evaluator.classifier
    out = {"eval_resolution": int(e.resolution),
           "protocol": "GigaGAN evaluation code + clean-fid: center crop, PIL LANCZOS to eval_resolution, "
                       "clean-fid bicubic to 299, clean-fid Inception; CLIP score as GigaGAN (\"A photo depicts\")",
           "reference": evaluator.ref["meta"] if evaluator.ref else None,
           "random_extractors": bool(e.random_extractors)}  # fmt: skip
    if clf is not None:
        out["classifier"] = {"folder": clf.folder, "identity": clf.identity, "attributes": clf.config.classes,
                             "input": clf.protocol,
                             "fd": "Fréchet distance of the penultimate features vs config.eval.real",
                             "fd_pr": f"precision/recall of the same features, k = {int(e.pr_k)}",
                             "prompt_acc": "share of images predicted as their prompt names (every attribute), over "
                                           "prompts naming exactly one class of every attribute",
                             "teacher_dist": "1 - cos of the penultimate features, student vs teacher ODE image on the "
                                             "same noise; teacher_dist_pixel: RMS pixel difference / 255"}  # fmt: skip
        out["classifier_reference"] = evaluator.cls_ref["meta"] if evaluator.cls_ref else None
    return out
