"""One-step sampling with a trained Diffusion2GAN generator (`--config.mode=sample`) and the image helpers that
evaluation shares.

    python -m d2g_jax.main --config=configs/sd15.py --workdir=/runs/sd15_cfg3 --config.mode=sample \
        --config.sample.prompts=/data/prompts.txt --config.sample.teacher=True

* The generator is the exported EMA U-Net (`<workdir>/export/step_<N>/unet`, diffusers format; the latest
  export, made first from the latest checkpoint when the run has none yet, or `sample.unet=<folder>`), in the
  x0-parameterisation `G(z, c) = (z − σ_T ε(z, c, T)) / α_T` at the teacher's last timestep (`export.json`);
  text encoders, VAE and noise schedule come from the teacher pipeline folder. No CFG: one U-Net call.
* `OneStepSampler`: prompts + noise → latents → VAE decode → uint8 images, one jitted function with the batch
  split over every device of the `(data, fsdp)` mesh (the U-Net FSDP-sharded as in training when
  `mesh.fsdp > 1`). Batches are padded to a fixed size, so there is one compile.
* Noise: image `i` of a run uses `noise_for_seed(seed + i)` = `jax.random.normal(PRNGKey(seed + i), [h, w, c])`,
  independent of the batch it lands in; the teacher side by side (`sample.teacher`) runs its DDIM ODE (the
  pairs' CFG scale and step count) on the same noise, so the two rows show what the student distilled.
* Images are converted as diffusers' `VaeImageProcessor` does for PIL output: `round(clip(x/2 + 0.5, 0, 1)·255)`.

Outputs of the sample mode: `<out>/<i:05d>.png` per image (`<i:05d>_teacher.png` with the teacher), `grid.png`
(student rows; each followed by the teacher's row when asked), `samples.jsonl` (index, seed, prompt, files) and
images/s in the log and `summary.json`. With an attribute classifier (`config.eval.classifier`, see
`d2g_jax.eval.attributes`) each `samples.jsonl` record also holds the prompt's attributes parsed with the
classifier's vocabulary ("attributes", null where the prompt does not name exactly one class), the classifier's
predictions for the image ("predicted", "predicted_prob") and, with the teacher, for the teacher's image
("teacher_predicted", "teacher_predicted_prob"), so anyone can check prompt accuracy with their own classifier.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from d2g_jax import sharding as shd
from d2g_jax.train.generator import Generator
from d2g_jax.train.state import put_global


def to_uint8(images: jax.Array) -> jax.Array:
    """VAE output in [-1, 1] (any float) → uint8 as diffusers' PIL postprocessing: round(clip(x/2+0.5)·255)."""
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255.0).astype(jnp.uint8)


def noise_for_seeds(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """[B, h, w, c] float32: row b is `jax.random.normal(PRNGKey(seeds[b]), shape)` (batch-independent)."""
    return np.asarray(_noise_batch(tuple(shape), jnp.asarray(np.asarray(seeds, np.uint32))))


@jax.jit(static_argnums=(0,))
def _noise_batch(shape, seeds):
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)


def latest_export(export_dir: str) -> str | None:
    """The `unet/` folder of the highest `step_<N>` export holding `export.json`, or None."""
    done = [d for d in glob.glob(os.path.join(export_dir, "step_*")) if os.path.isfile(os.path.join(d, "export.json"))]
    if not done:
        return None
    return os.path.join(max(done, key=lambda d: int(os.path.basename(d)[len("step_") :])), "unet")


def read_export_info(unet_dir: str) -> dict[str, Any]:
    """`export.json` next to an exported `unet/` folder ({} for a plain diffusers U-Net folder)."""
    path = os.path.join(os.path.dirname(os.path.abspath(unet_dir)), "export.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class OneStepSampler:
    """The one-step generator with its text encoder and VAE decoder, jitted and sharded over `mesh`.

    Attributes:
      gen: the generator (U-Net module + schedule + T); params: its U-Net params (global arrays on `mesh`).
      text: the teacher's `TextEncoder`; vae: `(module, variables)` of the VAE decoder (replicated).
      latent_shape: (h, w, c) of one latent; batch_size: the fixed global batch of one call.
      teacher_params: the teacher U-Net's params for `teacher_images` (None: not loaded).
    """

    gen: Generator
    params: Any
    text: Any
    vae: tuple[Any, Any]
    mesh: Mesh
    latent_shape: tuple[int, int, int]
    batch_size: int
    schedule: Any = None
    teacher_params: Any = None
    source: str = ""

    @classmethod
    def load(
        cls,
        teacher_folder: str,
        unet_folder: str,
        *,
        resolution: int,
        batch_size: int,
        mesh: Mesh,
        dtype: Any = jnp.bfloat16,
        with_teacher: bool = False,
    ) -> OneStepSampler:
        """Loads text encoders, VAE decoder and schedule from `teacher_folder` and the generator's U-Net from
        `unet_folder` (an export, or any diffusers U-Net of the same architecture); `with_teacher` also loads
        the teacher's own U-Net params for `teacher_images`."""
        from d2g_jax.models.text import TextEncoder
        from d2g_jax.models.unet import abstract_variables, load_unet
        from d2g_jax.models.vae import load_vae
        from d2g_jax.sampling import DDIMSchedule, _vae_scale_factor

        if not os.path.isfile(os.path.join(unet_folder, "config.json")):
            raise FileNotFoundError(f"{unet_folder}: no config.json; expected an exported generator's unet/ folder "
                                    "(<workdir>/export/step_<N>/unet) or a diffusers U-Net folder.")  # fmt: skip
        n_dev = mesh.size
        if batch_size % n_dev:
            raise ValueError(f"batch size {batch_size} must be a multiple of the {n_dev} devices.")
        dtype = jnp.dtype(dtype)
        vsf = _vae_scale_factor(teacher_folder)
        if resolution % vsf:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downscale factor {vsf}.")
        schedule = DDIMSchedule.from_pipeline(teacher_folder)
        info = read_export_info(unet_folder)
        unet, variables = load_unet(unet_folder, dtype=dtype, param_dtype=jnp.float32)
        gen = Generator(unet, schedule, vsf, timestep=info.get("timestep"))
        if info and abs(float(info["alpha_T"]) - gen.alpha_sigma[0]) > 1e-6:
            raise ValueError(f"{unet_folder}: export.json has α_T={info['alpha_T']} but the teacher "
                             f"{teacher_folder} gives {gen.alpha_sigma[0]} at T={gen.t}: another teacher's "
                             "schedule. Point config.teacher.path at the run's teacher.")  # fmt: skip
        param_sh = shd.param_shardings(abstract_variables(unet)["params"], mesh)
        params = put_global(variables["params"], param_sh)
        teacher_params = None
        if with_teacher:
            _, tvars = load_unet(os.path.join(teacher_folder, "unet"), dtype=dtype, param_dtype=jnp.float32)
            teacher_params = put_global(tvars["params"], param_sh)
        vae_mod, vae_vars = load_vae(teacher_folder, parts=("decoder",), dtype=jnp.float32)
        rep = shd.replicated(mesh)
        vae_vars = put_global(vae_vars, jax.tree.map(lambda _: rep, vae_vars))
        text = TextEncoder.from_pipeline(teacher_folder, dtype=dtype)
        side = resolution // vsf
        return cls(gen, params, text, (vae_mod, vae_vars), mesh, (side, side, unet.config.in_channels),
                   int(batch_size), schedule, teacher_params, os.path.abspath(unet_folder))  # fmt: skip

    # --- jitted pieces ---

    def _shardings(self):
        b4 = shd.batch_sharding(self.mesh, 4)
        b2 = shd.batch_sharding(self.mesh, 2)
        n = len(self.text.modules)
        return b4, (b2,) * n

    @property
    def _student_fn(self):
        if getattr(self, "_student", None) is None:
            vae_mod = self.vae[0]

            def fn(params, text_params, vae_vars, noise, ids, masks):
                cond = self.text.embed(text_params, ids, masks)
                x0 = self.gen(params, noise, cond)
                return to_uint8(vae_mod.apply(vae_vars, x0, method="decode_latents"))

            b4, b2 = self._shardings()
            self._student = jax.jit(fn, in_shardings=(None, None, None, b4, b2, b2), out_shardings=b4)
        return self._student

    @property
    def _latent_fn(self):
        if getattr(self, "_latent", None) is None:

            def fn(params, text_params, noise, ids, masks):
                return self.gen(params, noise, self.text.embed(text_params, ids, masks))

            b4, b2 = self._shardings()
            self._latent = jax.jit(fn, in_shardings=(None, None, b4, b2, b2), out_shardings=b4)
        return self._latent

    def _teacher_fn(self, guidance_scale: float, num_steps: int):
        key = (float(guidance_scale), int(num_steps))
        cache = self.__dict__.setdefault("_teachers", {})
        if key not in cache:
            from d2g_jax.sampling import ddim_sample

            vae_mod, unet = self.vae[0], self.gen.unet
            use_cfg = key[0] > 1.0

            def fn(params, text_params, vae_vars, noise, ids, masks, neg_ids, neg_masks):
                cond = self.text.embed(text_params, ids, masks)
                uncond = None
                if use_cfg:
                    if self.text.force_zeros_for_empty_prompt:
                        uncond = jax.tree.map(jnp.zeros_like, cond)
                    else:
                        uncond = self.text.embed(text_params, neg_ids, neg_masks, negative=True)
                x0 = ddim_sample(unet.apply, {"params": params}, noise, cond, uncond, key[0], self.schedule, key[1],
                                 vae_scale_factor=self.gen.vae_scale_factor)  # fmt: skip
                return to_uint8(vae_mod.apply(vae_vars, x0, method="decode_latents"))

            b4, b2 = self._shardings()
            cache[key] = jax.jit(fn, in_shardings=(None, None, None, b4, b2, b2, b2, b2), out_shardings=b4)
        return cache[key]

    # --- host API ---

    def _inputs(self, noise: np.ndarray, prompts: Sequence[str], negatives: bool = False):
        n = len(prompts)
        if noise.shape[0] != n:
            raise ValueError(f"{noise.shape[0]} noises for {n} prompts.")
        if n > self.batch_size:
            raise ValueError(f"{n} images exceed the batch size {self.batch_size}; split them (see `generate`).")
        pad = self.batch_size - n
        prompts = list(prompts) + [""] * pad
        noise = np.concatenate([noise, np.zeros((pad, *noise.shape[1:]), noise.dtype)]) if pad else noise
        b4, b2 = self._shardings()
        g = lambda xs: tuple(put_global(x, s) for x, s in zip(xs, b2))
        tok = self.text.tokenize(prompts)
        neg = self.text.tokenize([""] * self.batch_size) if negatives else None  # the teacher's CFG branch
        return (put_global(np.asarray(noise, np.float32), b4), g(tok.ids), g(tok.masks),
                g(neg.ids) if neg else None, g(neg.masks) if neg else None)  # fmt: skip

    def _gather(self, x: jax.Array, n: int) -> np.ndarray:
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)[:n]

    def images(self, noise: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """uint8 [B, H, W, 3] one-step images for `noise` [B, h, w, c] and B prompts (B ≤ batch_size)."""
        noise_g, ids, masks, _, _ = self._inputs(noise, prompts)
        out = self._student_fn(self.params, self.text.params, self.vae[1], noise_g, ids, masks)
        return self._gather(out, len(prompts))

    def latents(self, noise: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """float32 [B, h, w, c] generator output x0 (before the VAE; diffusers' `output_type="latent"`)."""
        noise_g, ids, masks, _, _ = self._inputs(noise, prompts)
        return self._gather(self._latent_fn(self.params, self.text.params, noise_g, ids, masks), len(prompts))

    def teacher_images(self, noise: np.ndarray, prompts: Sequence[str], guidance_scale: float, num_steps: int):
        """uint8 [B, H, W, 3]: the teacher's DDIM ODE (CFG `guidance_scale`, `num_steps`) on the same noise."""
        if self.teacher_params is None:
            raise ValueError("the teacher U-Net is not loaded: OneStepSampler.load(..., with_teacher=True).")
        noise_g, ids, masks, nids, nmasks = self._inputs(noise, prompts, negatives=True)
        fn = self._teacher_fn(guidance_scale, num_steps)
        out = fn(self.teacher_params, self.text.params, self.vae[1], noise_g, ids, masks, nids, nmasks)
        return self._gather(out, len(prompts))


# ----------------------------------------------------------------------------------------------------------
# The sample mode.


def generator_unet(config: ml_collections.ConfigDict, workdir: str, field: str = "sample.unet") -> str:
    """The U-Net folder to sample: `config.<field>` if set, else the run's latest export (exporting the latest
    checkpoint first when there is none)."""
    section, name = field.split(".")
    explicit = config[section][name]
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "config.json")):
            raise FileNotFoundError(f"config.{field}={explicit}: no config.json there; expected a diffusers U-Net "
                                    "folder such as <workdir>/export/step_<N>/unet.")  # fmt: skip
        return explicit
    from d2g_jax import pipeline

    export_dir = config.export.dir or os.path.join(workdir, "export")
    found = latest_export(export_dir)
    if found is None:
        logging.info("%s: no export yet; exporting the latest checkpoint first", export_dir)
        found = pipeline.run_export(config, workdir)
    return found


def sample_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """`sample.prompts` (a prompt file, see d2g_jax.data.prompts) or `sample.prompt` ("|"-separated), each
    repeated `sample.images_per_prompt` times."""
    from d2g_jax.data.prompts import read_prompts

    s = config.sample
    if bool(s.prompts) == bool(s.prompt):
        raise ValueError("set exactly one of config.sample.prompts (a .txt/.jsonl/.parquet file or tfds:…) and "
                         "config.sample.prompt ('a cat|a dog').")  # fmt: skip
    if s.prompts:
        prompts = read_prompts(s.prompts, field=s.prompt_field or None, limit=int(s.num_prompts) or None)
    else:
        prompts = [p.strip() for p in s.prompt.split("|")]
        if any(not p for p in prompts):
            raise ValueError(f"config.sample.prompt={s.prompt!r} has an empty prompt between '|'s.")
    if int(s.images_per_prompt) < 1:
        raise ValueError(f"config.sample.images_per_prompt={s.images_per_prompt} must be ≥ 1.")
    return [p for p in prompts for _ in range(int(s.images_per_prompt))]


def image_grid(rows: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """uint8 images [N, H, W, 3] per row group → one grid; each group wraps at `columns`, groups interleaved
    chunk by chunk (student chunk, teacher chunk, next student chunk, …)."""
    n, h, w = rows[0].shape[:3]
    columns = max(1, min(columns, n))
    chunks = []
    for start in range(0, n, columns):
        for r in rows:
            part = r[start : start + columns]
            if part.shape[0] < columns:
                part = np.concatenate([part, np.zeros((columns - part.shape[0], h, w, 3), np.uint8)])
            chunks.append(np.concatenate(list(part), axis=1))
    return np.concatenate(chunks, axis=0)


def _sample_classifier(config: ml_collections.ConfigDict):
    """The attribute classifier of `config.eval.classifier` (None if unset) for the samples.jsonl attributes;
    refuses one that cannot read the generator's images at their native resolution."""
    if not config.eval.classifier:
        return None
    from d2g_jax.eval.attributes import load_classifier

    clf = load_classifier(config.eval.classifier)
    if int(config.pairs.resolution) != clf.input_size:
        raise ValueError(f"config.eval.classifier={config.eval.classifier} reads {clf.input_size}×{clf.input_size} "
                         f"images but the generator makes {config.pairs.resolution}×{config.pairs.resolution} "
                         "(config.pairs.resolution); unset config.eval.classifier or use one trained at that "
                         "resolution.")  # fmt: skip
    return clf


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`--config.mode=sample`: PNGs + grid + samples.jsonl under `sample.out_dir` (default
    `<workdir>/samples/<export step>`); returns that folder."""
    from d2g_jax import pipeline
    from d2g_jax.train.trainer import write_png

    s = config.sample
    prompts = sample_prompts(config)
    seeds = [int(s.seed) + i for i in range(len(prompts))]
    clf = _sample_classifier(config) if jax.process_index() == 0 else None
    teacher = pipeline.teacher_path(config, workdir)
    unet_dir = generator_unet(config, workdir)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    batch = int(s.batch_size) or mesh.size
    batch = math.ceil(batch / mesh.size) * mesh.size
    sampler = OneStepSampler.load(teacher, unet_dir, resolution=int(config.pairs.resolution), batch_size=batch,
                                  mesh=mesh, dtype=s.dtype or config.teacher.dtype,
                                  with_teacher=bool(s.teacher))  # fmt: skip
    info = read_export_info(unet_dir)
    tag = f"step_{int(info['step']):08d}" if "step" in info else os.path.basename(os.path.dirname(unet_dir))
    out = s.out_dir or os.path.join(workdir, "samples", tag)
    if os.path.isfile(os.path.join(out, "samples.jsonl")):
        raise FileExistsError(f"{out}: holds samples already (samples.jsonl); set config.sample.out_dir to a new "
                              "folder or remove it.")  # fmt: skip
    os.makedirs(out, exist_ok=True)
    teacher_ode = (float(config.pairs.guidance_scale), int(config.pairs.num_steps)) if s.teacher else None
    students, teachers, records = [], [], []
    t_total, n_timed = 0.0, 0
    for start in range(0, len(prompts), batch):
        p, sd = prompts[start : start + batch], seeds[start : start + batch]
        z = noise_for_seeds(sd, sampler.latent_shape)
        t0 = time.perf_counter()
        img = sampler.images(z, p)
        if start:  # the first batch includes the compile
            t_total += time.perf_counter() - t0
            n_timed += len(img)
        students.append(img)
        t_img = sampler.teacher_images(z, p, *teacher_ode) if teacher_ode else None
        if teacher_ode:
            teachers.append(t_img)
        fields = clf.attribute_fields(p, clf.run(img)[1]) if clf else None
        t_fields = clf.attribute_fields(p, clf.run(t_img)[1]) if clf and teacher_ode else None
        for j in range(len(img)):
            i = start + j
            rec = {"index": i, "seed": seeds[i], "prompt": prompts[i], "file": f"{i:05d}.png"}
            if teacher_ode:
                rec["teacher_file"] = f"{i:05d}_teacher.png"
            if fields:
                rec.update(fields[j])
            if t_fields:
                rec["teacher_predicted"] = t_fields[j]["predicted"]
                rec["teacher_predicted_prob"] = t_fields[j]["predicted_prob"]
            if jax.process_index() == 0:
                write_png(os.path.join(out, rec["file"]), img[j])
                if teacher_ode:
                    write_png(os.path.join(out, rec["teacher_file"]), t_img[j])
            records.append(rec)
    if not n_timed:  # a single batch: time a second call of the compiled function
        z = noise_for_seeds(seeds[:batch], sampler.latent_shape)
        t0 = time.perf_counter()
        n_timed = len(sampler.images(z, prompts[:batch]))
        t_total = time.perf_counter() - t0
    student_all = np.concatenate(students)
    rows = [student_all] + ([np.concatenate(teachers)] if teacher_ode else [])
    ips = n_timed / t_total
    summary = {"images": len(prompts), "unet": os.path.abspath(unet_dir), "teacher": os.path.abspath(teacher),
               "images_per_s": ips, "batch_size": batch, "devices": mesh.size,
               "teacher_ode": {"guidance_scale": teacher_ode[0], "num_steps": teacher_ode[1]} if teacher_ode else None,
               "classifier": {"folder": clf.folder, "identity": clf.identity} if clf else None}  # fmt: skip
    if jax.process_index() == 0:
        write_png(os.path.join(out, "grid.png"), image_grid(rows, int(s.grid_columns)))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        tmp = os.path.join(out, "samples.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, os.path.join(out, "samples.jsonl"))
    logging.info("sample: %d images → %s (%.2f images/s one-step, after compile, batch %d on %d devices)",
                 len(prompts), out, ips, batch, mesh.size)  # fmt: skip
    return out
