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
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from d2g_jax import files
from d2g_jax import sharding as shd
from d2g_jax import workdir as wd
from d2g_jax.train.generator import Generator


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
    teacher_key: str = ""  # what determines `teacher_images` (teacher fingerprint, compute dtype), for caches

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
        info = wd.read_export_info(unet_folder)
        unet, variables = load_unet(unet_folder, dtype=dtype, param_dtype=jnp.float32)
        gen = Generator(unet, schedule, vsf, timestep=info.get("timestep"))
        if info and abs(float(info["alpha_T"]) - gen.alpha_sigma[0]) > 1e-6:
            raise ValueError(f"{unet_folder}: export.json has α_T={info['alpha_T']} but the teacher "
                             f"{teacher_folder} gives {gen.alpha_sigma[0]} at T={gen.t}: another teacher's "
                             "schedule. Point config.teacher.path at the run's teacher.")  # fmt: skip
        param_sh = shd.param_shardings(abstract_variables(unet)["params"], mesh)
        params = shd.put_global(variables["params"], param_sh)
        teacher_params, teacher_key = None, ""
        if with_teacher:
            import json

            from d2g_jax.sampling import pipeline_fingerprint

            teacher_key = json.dumps({"teacher": pipeline_fingerprint(teacher_folder), "dtype": dtype.name},
                                     sort_keys=True, default=str)  # fmt: skip
            _, tvars = load_unet(os.path.join(teacher_folder, "unet"), dtype=dtype, param_dtype=jnp.float32)
            teacher_params = shd.put_global(tvars["params"], param_sh)
        vae_mod, vae_vars = load_vae(teacher_folder, parts=("decoder",), dtype=jnp.float32)
        vae_vars = shd.replicate(vae_vars, mesh)
        text = TextEncoder.from_pipeline(teacher_folder, dtype=dtype)
        side = resolution // vsf
        return cls(gen, params, text, (vae_mod, vae_vars), mesh, (side, side, unet.config.in_channels),
                   int(batch_size), schedule, teacher_params, os.path.abspath(unet_folder), teacher_key)  # fmt: skip

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
        g = lambda xs: tuple(shd.put_global(x, s) for x, s in zip(xs, b2))
        tok = self.text.tokenize(prompts)
        neg = self.text.tokenize([""] * self.batch_size) if negatives else None  # the teacher's CFG branch
        return (shd.put_global(np.asarray(noise, np.float32), b4), g(tok.ids), g(tok.masks),
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
# Sample sets (the sample mode writes one with `write_samples`).


def sample_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """`sample.prompts` (a prompt file, see d2g_jax.data.prompts) or `sample.prompt` ("|"-separated), each
    repeated `sample.images_per_prompt` times (the fields are checked by `d2g_jax.validate`)."""
    from d2g_jax.data.prompts import read_prompts

    s = config.sample
    if s.prompts:
        prompts = read_prompts(s.prompts, field=s.prompt_field or None, limit=int(s.num_prompts) or None)
    else:
        prompts = [p.strip() for p in s.prompt.split("|")]
    return [p for p in prompts for _ in range(int(s.images_per_prompt))]


def check_out_dir(out: str) -> None:
    """A sample folder must be new or empty: nothing in it is ever overwritten."""
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out}: exists and is not empty; set config.sample.out_dir to a new or empty folder "
                              "(nothing in an existing one is overwritten).")  # fmt: skip


def write_samples(out: str, sampler: OneStepSampler, prompts: Sequence[str], seeds: Sequence[int], *,
                  teacher_ode: tuple[float, int] | None = None, columns: int = 8,
                  annotate: Callable[[np.ndarray, Sequence[str], str], list[dict[str, Any]]] | None = None,
                  extra: dict[str, Any] | None = None, teacher_first: bool = False) -> dict[str, Any]:  # fmt: skip
    """Generates one image per (prompt, seed) into the new or empty folder `out`: `<i:05d>.png`
    (`<i:05d>_teacher.png` with `teacher_ode` = (CFG scale, steps)), `grid.png` (student rows, each followed by the
    teacher's; `teacher_first`: each teacher row above its student row), `samples.jsonl` (index, seed, prompt, files,
    and what `annotate(images, prompts, who)` adds per image, who = "student"/"teacher") and `summary.json`
    (images/s after compile). Returns the summary."""
    check_out_dir(out)
    main = jax.process_index() == 0
    if main:
        os.makedirs(out, exist_ok=True)
    batch = sampler.batch_size
    students, teachers, records = [], [], []
    t_total, n_timed = 0.0, 0
    for start in range(0, len(prompts), batch):
        p, sd = list(prompts[start : start + batch]), list(seeds[start : start + batch])
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
        fields = annotate(img, p, "student") if annotate and main else None
        t_fields = annotate(t_img, p, "teacher") if annotate and main and teacher_ode else None
        for j in range(len(img)):
            i = start + j
            rec = {"index": i, "seed": int(seeds[i]), "prompt": prompts[i], "file": f"{i:05d}.png"}
            if teacher_ode:
                rec["teacher_file"] = f"{i:05d}_teacher.png"
            if fields:
                rec.update(fields[j])
            if t_fields:
                rec.update(t_fields[j])
            if main:
                files.write_png(os.path.join(out, rec["file"]), img[j])
                if teacher_ode:
                    files.write_png(os.path.join(out, rec["teacher_file"]), t_img[j])
            records.append(rec)
    if not n_timed:  # a single batch: time a second call of the compiled function
        z = noise_for_seeds(list(seeds[:batch]), sampler.latent_shape)
        t0 = time.perf_counter()
        n_timed = len(sampler.images(z, list(prompts[:batch])))
        t_total = time.perf_counter() - t0
    groups = [np.concatenate(students)] + ([np.concatenate(teachers)] if teacher_ode else [])
    if teacher_first:
        groups = groups[::-1]
    summary = {"images": len(prompts), "images_per_s": n_timed / t_total, "batch_size": batch,
               "teacher_ode": {"guidance_scale": teacher_ode[0], "num_steps": teacher_ode[1]} if teacher_ode else None,
               **(extra or {})}  # fmt: skip
    if main:
        files.write_png(os.path.join(out, "grid.png"), files.image_grid(groups, columns))
        files.atomic_write_json(os.path.join(out, "summary.json"), summary)
        files.atomic_write_text(os.path.join(out, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return summary
