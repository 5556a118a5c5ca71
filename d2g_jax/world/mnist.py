"""The MNIST world as a run's stand-in for a Stable Diffusion folder and its datasets (`config.world.provider`).

`configs/mnist.py` sets `config.world.provider = "d2g_jax.world.mnist"`; before any phase, `d2g_jax.pipeline` imports
this module by that name (the system never imports `d2g_jax.world` otherwise) and calls `prepare(config, workdir)`,
which:

1. verifies the built world (`config.world.dir`, default the shipped `d2g_jax/world/assets/mnist`): `world.json`
   exists, was built with `config.world.seed`, and every file it lists is present with its recorded sha256. A
   missing or damaged part, or a world of another seed, is refused with a message naming the file or field and the
   command that rebuilds it (`python -m d2g_jax.world.build`) — never silently reused;
2. writes the world's datasets into `<workdir>/world/` (once; a rerun finds them complete): `train/` and
   `heldout/` (`images/*.png` + `captions.jsonl`, see `d2g_jax/world/data.py`) and `captions_all.txt` (the 80
   digit × colour captions);
3. returns the config values that point the run at them. `pipeline` applies each one only where the config's field is
   empty, so a value given on the command line wins.
"""

from __future__ import annotations

import json
import os
from typing import Any

from d2g_jax.world import data as W

DEFAULT_DIR = os.path.join(W.ASSETS, "mnist")
REBUILD = "python -m d2g_jax.world.build --seed {seed} --out {out}"


class WorldError(RuntimeError):
    """The built world is missing, damaged, or not the one the config asks for."""


def world_dir(config: Any) -> str:
    return os.path.abspath(config.world.dir or DEFAULT_DIR)


def verify(folder: str, seed: int) -> dict[str, Any]:
    """`world.json` of a complete, intact world built with `seed`; raises WorldError naming what is wrong."""
    from d2g_jax.world.build import sha256_file

    manifest_path = os.path.join(folder, "world.json")
    rebuild = REBUILD.format(seed=seed, out=folder)
    if not os.path.isfile(manifest_path):
        raise WorldError(f"{manifest_path}: missing — no built MNIST world in {folder} (config.world.dir). Build it "
                         f"with `{rebuild}` (about an hour on 2 CPU cores), or restore the shipped one with "
                         "`git checkout -- d2g_jax/world/assets`.")  # fmt: skip
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files, built_seed = manifest["files"], int(manifest["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise WorldError(f"{manifest_path}: unreadable world manifest ({type(e).__name__}: {e}). Rebuild with "
                         f"`{rebuild}`.") from None  # fmt: skip
    if built_seed != int(seed):
        raise WorldError(f"config.world.seed={seed} but the world in {folder} was built with seed {built_seed}. Build "
                         f"a world with that seed (`python -m d2g_jax.world.build --seed {seed} --out DIR`) and set "
                         f"--config.world.dir=DIR, or set --config.world.seed={built_seed}.")  # fmt: skip
    digits_sha = manifest.get("data", {}).get("digits_sha256")
    if digits_sha and sha256_file(W.DIGITS_FILE) != digits_sha:
        raise WorldError(f"{W.DIGITS_FILE}: differs from the digits the world in {folder} was built from "
                         f"(sha256 in {manifest_path}). Restore it (`git checkout -- {W.DIGITS_FILE}`) or rebuild "
                         f"with `{rebuild}`.")  # fmt: skip
    part_names = {"pipeline": "the teacher pipeline", "latent_lpips": "the LatentLPIPS", "classifier": "the "
                  "evaluation classifier"}  # fmt: skip
    for rel, digest in files.items():
        path = os.path.join(folder, rel)
        part = part_names.get(rel.split("/")[0], rel.split("/")[0])
        if not os.path.isfile(path):
            raise WorldError(f"{path}: missing ({part} of the MNIST world). Restore it (`git checkout -- "
                             f"d2g_jax/world/assets`) or rebuild with `{rebuild}`.")  # fmt: skip
        if sha256_file(path) != digest:
            raise WorldError(f"{path}: damaged — its sha256 differs from {manifest_path} ({part} of the MNIST "
                             f"world). Restore it (`git checkout -- d2g_jax/world/assets`) or rebuild with "
                             f"`{rebuild}`.")  # fmt: skip
    return manifest


def write_datasets(workdir: str, seed: int) -> dict[str, str]:
    """The world's datasets under `<workdir>/world/` (idempotent); returns their paths."""
    root = os.path.join(workdir, "world")
    splits = W.world_splits(seed)
    paths = {name: W.write_dataset(os.path.join(root, name), split) for name, split in splits.items()}
    all_path = os.path.join(root, "captions_all.txt")
    text = "".join(c + "\n" for c in W.all_captions())
    if not os.path.isfile(all_path) or open(all_path).read() != text:
        with open(all_path + ".tmp", "w") as f:
            f.write(text)
        os.replace(all_path + ".tmp", all_path)
    paths["all_captions"] = all_path
    return paths


def prepare(config: Any, workdir: str) -> dict[str, Any]:
    """Verifies the world, writes its datasets into the workdir (process 0; the others wait), and returns
    `{config field: value}` for the run (see the module docstring)."""
    import jax

    folder = world_dir(config)
    seed = int(config.world.seed)
    manifest = verify(folder, seed)
    if jax.process_index() == 0:
        paths = write_datasets(workdir, seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("d2g_jax: world datasets written")
    root = os.path.join(workdir, "world")
    paths = {"train": os.path.join(root, "train"), "heldout": os.path.join(root, "heldout"),
             "all_captions": os.path.join(root, "captions_all.txt")}  # fmt: skip
    return {
        "teacher.path": os.path.join(folder, "pipeline"),
        "loss.ckpt_dir": os.path.join(folder, "latent_lpips"),
        "loss.encoder": manifest.get("latent_lpips_name", "mnist"),
        "pairs.prompts": os.path.join(paths["train"], "captions.jsonl"),
        "eval.prompts": os.path.join(paths["heldout"], "captions.jsonl"),
        "eval.real": os.path.join(paths["heldout"], "images"),
        "eval.real_name": f"mnist_heldout_s{seed}",
        "eval.classifier": os.path.join(folder, "classifier"),
        "sample.prompts": paths["all_captions"],
        "report.real": paths["train"],
    }
