"""`--config.mode=export` on a finished run restores only the EMA: no LatentVGG, no data loader, no pairs; the
exported weights equal the checkpoint's EMA; `export.json` (the completion marker) is written atomically after the
weights; a step folder holding another run's export is refused, not skipped."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from d2g_jax import export as export_mod
from d2g_jax import files, pipeline
from d2g_jax.export import ExportError
from d2g_jax.models.unet import load_unet


def _config():
    c = tiny.get_config()
    c.pairs.num_pairs, c.pairs.num_steps, c.pairs.shard_size = 16, 2, 8
    c.train.num_steps, c.train.ckpt_every, c.train.log_every = 2, 2, 1
    c.train.eval_every = c.train.sample_every = 0
    c.train.holdout = 4
    c.stage2.num_steps = 0
    c.mode = "train"
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("export") / "run")
    c = _config()
    with c.unlocked():
        c.mode = "all"
        c.export.dir = os.path.join(wd, "nothing_yet")  # mode=all exports here; the tests export elsewhere
    pipeline.run(c, wd)
    return wd


def _boom(what):
    def f(*a, **k):
        raise AssertionError(f"export built {what}")

    return f


def test_export_restores_only_the_ema(finished, monkeypatch, tmp_path):
    wd = str(tmp_path / "copy")
    shutil.copytree(finished, wd)
    shutil.rmtree(os.path.join(wd, "pairs"))  # the export needs no pairs
    import d2g_jax.data.loader as loader
    import d2g_jax.losses.elatentlpips as el
    import d2g_jax.train.distill as distill

    for mod, name in ((el, "load_latent_lpips"), (el, "random_latent_lpips"), (distill, "load_distill_loss"),
                      (loader, "make_loader"), (loader, "PairsSource")):  # fmt: skip
        monkeypatch.setattr(mod, name, _boom(name))
    order = []
    real_write = files.atomic_write_json

    def marker(path, obj, **kw):  # export.json: written after the weights, under a temporary name
        if path.endswith("export.json"):
            unet = os.path.join(os.path.dirname(path), "unet")
            assert os.path.isfile(os.path.join(unet, "config.json"))
            assert os.path.isfile(os.path.join(unet, "diffusion_pytorch_model.safetensors"))
            assert not os.path.exists(path)
            order.append("export.json")
        return real_write(path, obj, **kw)

    monkeypatch.setattr(export_mod.files, "atomic_write_json", marker)
    c = _config()
    c.mode = "export"
    pipeline.run(c, wd)
    out = os.path.join(wd, "export", "step_00000002")
    assert order == ["export.json"] and sorted(os.listdir(out)) == ["export.json", "unet"]
    info = json.load(open(os.path.join(out, "export.json")))
    assert info["step"] == 2 and info["stage"] == "stage1" and info["run"] and info["teacher_fingerprint"]
    state = ocp.StandardCheckpointer().restore(os.path.join(wd, "stage1", "checkpoints", "2", "state"))
    _, exported = load_unet(os.path.join(out, "unet"))
    for a, b in zip(jax.tree.leaves(exported["params"]), jax.tree.leaves(state["ema"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pipeline.run(c, wd)  # again: this run's export is kept as it is
    assert json.load(open(os.path.join(out, "export.json"))) == info


def test_foreign_export_folder_is_refused(finished, tmp_path):
    wd = str(tmp_path / "copy")
    shutil.copytree(finished, wd)
    out = os.path.join(wd, "theirs", "step_00000002")
    os.makedirs(os.path.join(out, "unet"))
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump({"step": 2, "stage": "stage1", "run": "someone-else", "teacher_fingerprint": "x"}, f)
    c = _config()
    c.mode, c.export.dir = "export", os.path.join(wd, "theirs")
    with pytest.raises(ExportError, match="another run's export"):
        pipeline.run(c, wd)
    assert os.listdir(os.path.join(out, "unet")) == []  # untouched
    user = os.path.join(wd, "mine", "step_00000002")
    os.makedirs(user)
    open(os.path.join(user, "notes.txt"), "w").write("mine")
    c.export.dir = os.path.join(wd, "mine")
    with pytest.raises(ExportError, match="not an export of this run"):
        pipeline.run(c, wd)
    assert open(os.path.join(user, "notes.txt")).read() == "mine"
