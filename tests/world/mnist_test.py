"""The MNIST world as a run's provider: a built world is verified file by file before use (missing, damaged or
other-seed worlds are refused with the file/field and the rebuild command), its datasets are written into the
workdir once, and `pipeline.resolve_world` fills only the config fields left empty."""

import json
import os
import shutil

import pytest

from configs import mnist as mnist_config
from d2g_jax import pipeline
from d2g_jax.world import mnist as M
from d2g_jax.world.build import tree_hashes


def fake_world(folder, seed=0):
    """A world folder with the shipped layout and a manifest whose hashes match (the files' content is irrelevant
    to the verification)."""
    for rel in ("pipeline/model_index.json", "pipeline/unet/config.json", "latent_lpips/mnist_latent_vgg16.pth.tar",
                "classifier/config.json"):  # fmt: skip
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(rel)
    files = tree_hashes(folder)
    with open(os.path.join(folder, "world.json"), "w") as f:
        json.dump({"world": "mnist", "seed": seed, "files": files, "latent_lpips_name": "mnist"}, f)
    return folder


def config_for(world_dir, seed=0):
    c = mnist_config.get_config()
    c.world.dir, c.world.seed = str(world_dir), seed
    return c


def test_verify_accepts_intact_and_names_what_is_wrong(tmp_path):
    w = fake_world(str(tmp_path / "w"))
    assert M.verify(w, 0)["seed"] == 0
    with pytest.raises(M.WorldError, match=r"config.world.seed=1 .* built with seed 0.*--seed 1"):
        M.verify(w, 1)
    unet_cfg = os.path.join(w, "pipeline", "unet", "config.json")
    with open(unet_cfg, "a") as f:
        f.write(" ")
    with pytest.raises(M.WorldError, match=r"unet/config.json: damaged .*teacher pipeline.*d2g_jax.world.build"):
        M.verify(w, 0)
    os.remove(unet_cfg)
    with pytest.raises(M.WorldError, match=r"unet/config.json: missing \(the teacher pipeline"):
        M.verify(w, 0)
    shutil.rmtree(w)
    with pytest.raises(M.WorldError, match=r"world.json: missing .*config.world.dir"):
        M.verify(w, 0)


def test_prepare_writes_datasets_once_and_resolve_fills_empty_fields(tmp_path):
    w = fake_world(str(tmp_path / "w"))
    work = str(tmp_path / "run")
    os.makedirs(work)
    config = config_for(w)
    with config.unlocked():
        config.eval.real_name = ""
        config.sample.prompts = "/my/prompts.txt"  # given by the user: kept
    resolved = pipeline.resolve_world(config, work)
    assert resolved.teacher.path == os.path.join(os.path.abspath(w), "pipeline")
    assert resolved.loss.ckpt_dir == os.path.join(os.path.abspath(w), "latent_lpips")
    assert resolved.loss.encoder == "mnist"
    assert resolved.pairs.prompts == os.path.join(work, "world", "train", "captions.jsonl")
    assert resolved.eval.real == os.path.join(work, "world", "heldout", "images")
    assert resolved.eval.classifier == os.path.join(os.path.abspath(w), "classifier")
    assert resolved.sample.prompts == "/my/prompts.txt"
    assert len(os.listdir(resolved.eval.real)) == 500
    assert sum(1 for _ in open(resolved.pairs.prompts)) == 4500
    stamp = os.path.getmtime(os.path.join(work, "world", "heldout", "captions.jsonl"))
    pipeline.resolve_world(config, work)  # a rerun keeps the complete datasets
    assert os.path.getmtime(os.path.join(work, "world", "heldout", "captions.jsonl")) == stamp


def test_resolve_world_refuses_a_world_of_another_seed_before_writing(tmp_path):
    w = fake_world(str(tmp_path / "w"), seed=3)
    work = str(tmp_path / "run")
    os.makedirs(work)
    with pytest.raises(M.WorldError, match="built with seed 3"):
        pipeline.resolve_world(config_for(w, seed=0), work)
    assert not os.path.exists(os.path.join(work, "world"))


def test_shipped_world_is_intact():
    """The world in the repository verifies (every file present with its recorded sha256)."""
    manifest = M.verify(M.DEFAULT_DIR, 0)
    assert {"pipeline", "latent_lpips", "classifier"} <= {k.split("/")[0] for k in manifest["files"]}
    size = sum(os.path.getsize(os.path.join(M.DEFAULT_DIR, k)) for k in manifest["files"])
    assert size < 20 * 2**20
