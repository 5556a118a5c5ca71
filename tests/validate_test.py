"""`validate(config)` stops a bad config before the first phase writes anything: one case per rule that used to
surface only after the pairs or stage 1 had run (stage 2, periodic eval, sample, eval), and the range checks, each
naming its field. The workdir stays empty: no teacher, pairs, run.json or checkpoint."""

import os

import pytest

from configs import base, mnist, sd15, sd15_cfg8, sdxl, tiny
from d2g_jax import pipeline
from d2g_jax.validate import ConfigError, phases, validate


def _tiny():
    c = tiny.get_config()
    c.pairs.num_pairs = 16
    return c


def _set(c, field, value):
    node, *path = field.split(".")
    parent = c[node] if path else c
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1] if path else node] = value


# (overrides, field named in the error): rules of later phases that used to fail after earlier phases had run.
LATE = [
    ({"train.grad_accum": 4, "train.batch_size": 32}, "config.train.grad_accum=4: stage 2 takes whole batches"),
    ({"disc.r1_interval": 0}, "config.disc.r1_interval=0"),
    ({"disc.r1_samples": 0}, "config.disc.r1_samples=0"),
    ({"disc.noise_aug": True, "disc.noise_aug_t_max": 1000}, "config.disc.noise_aug_t_min/max"),
    ({"disc.timestep": 1000}, "config.disc.timestep=1000"),
    ({"disc.lr_schedule": "bogus"}, "config.disc.lr_schedule='bogus'"),
    ({"disc.mix_match_fraction": 0.99}, "config.disc.mix_match_fraction"),
    ({"disc.mix_match_types": "noise,colour"}, "config.disc.mix_match_types"),
    ({"disc.remat": "bogus_policy"}, "config.disc.remat='bogus_policy'"),
    ({"stage2.batch_size": 3}, "config.stage2.batch_size=3 must be a multiple of 8"),
    ({"stage2.init_from": "/nonexistent/run"}, "config.stage2.init_from=/nonexistent/run: no stage-1 checkpoints"),
    ({"stage2.init_from": "/nonexistent/run", "stage2.num_steps": 0}, "nothing to train"),
    ({"eval.every": 10, "eval.metrics": "fid,nonsense"}, "unknown ['nonsense']"),
    ({"eval.every": 10, "eval.metrics": "fd", "eval.classifier": ""}, "config.eval.real is empty"),
    ({"eval.every": 10, "eval.metrics": "prompt_acc"}, "config.eval.classifier is empty"),
    ({"eval.every": 10, "eval.metrics": "dreamdiv", "eval.dreamdiv_per_prompt": 1},
     "config.eval.dreamdiv_per_prompt=1"),
    ({"eval.every": 10, "eval.subset": 0}, "config.eval.subset=0"),
    ({"loss.kind": "l3"}, "config.loss.kind='l3'"),
    ({"loss.augment": "bgx"}, "config.loss.augment"),
    ({"export.dtype": "float64"}, "config.export.dtype='float64'"),
]

# Out-of-range values that used to be accepted (or failed with an error that named no field).
RANGES = [
    ({"train.lr": -1e-3}, "config.train.lr=-0.001 must be ≥ 0"),
    ({"train.lr_end": 1e-3, "train.lr": 1e-4}, "config.train.lr_end=0.001 exceeds config.train.lr=0.0001"),
    ({"pairs.guidance_scale": 0.0}, "config.pairs.guidance_scale=0.0 must be ≥ 1.0"),
    ({"pairs.guidance_scale": -5.0}, "config.pairs.guidance_scale=-5.0"),
    ({"train.grad_accum": 0}, "config.train.grad_accum=0 must be ≥ 1"),
    ({"train.num_steps": 0}, "config.train.num_steps=0 must be ≥ 1"),
    ({"train.batch_size": 0}, "config.train.batch_size=0 must be ≥ 1"),
    ({"teacher.dtype": "float33"}, "config.teacher.dtype='float33'"),
    ({"train.ema_beta": 1.5}, "config.train.ema_beta=1.5"),
    ({"train.ckpt_every": 0}, "config.train.ckpt_every=0"),
    ({"pairs.num_pairs": 0}, "config.pairs.num_pairs=0"),
    ({"pairs.resolution": 30}, "config.pairs.resolution=30 is not a multiple of the VAE's downscale factor 4"),
    ({"disc.b2": 1.0}, "config.disc.b2=1.0"),
    ({"mesh.data": 3}, "config.mesh.data=3"),
]


@pytest.mark.parametrize("overrides,needle", LATE + RANGES, ids=lambda x: str(x)[:60])
def test_refused_before_anything_is_written(tmp_path, overrides, needle):
    c = _tiny()
    for k, v in overrides.items():
        _set(c, k, v)
    if "pairs.resolution" in overrides:  # the VAE's factor is read from the teacher folder
        c.teacher.tiny, c.teacher.path = False, _tiny_teacher(tmp_path)
        c.pairs.prompts = str(tmp_path / "p.txt")
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError) as e:
        pipeline.run(c, str(wd))
    assert needle in str(e.value), str(e.value)
    assert not wd.exists() or not os.listdir(wd), os.listdir(wd)


def _tiny_teacher(tmp_path):
    from d2g_jax.models.tiny import write_tiny_pipeline

    return write_tiny_pipeline(str(tmp_path / "teacher"))


USE = [
    ({"mode": "sample", "sample.prompts": "/p.txt"}, "exactly one of config.sample.prompts"),
    ({"mode": "sample", "sample.prompt": ""}, "exactly one of config.sample.prompts"),
    ({"mode": "sample", "sample.prompt": "a||b"}, "has an empty prompt between '|'s"),
    ({"mode": "sample", "sample.images_per_prompt": 0}, "config.sample.images_per_prompt=0"),
    ({"mode": "sample", "sample.unet": "/nowhere"}, "config.sample.unet=/nowhere"),
    ({"mode": "eval", "eval.metrics": "clip", "eval.random_extractors": False}, "config.eval.clip is empty"),
    ({"mode": "eval", "eval.images": "/nowhere"}, "config.eval.images=/nowhere: no such folder"),
    ({"mode": "nonsense"}, "config.mode='nonsense' is not a phase"),
    ({"mode": "verify"}, "no such folder; --config.mode=verify checks an existing run's workdir"),
]


@pytest.mark.parametrize("overrides,needle", USE, ids=lambda x: str(x)[:60])
def test_use_modes_refused_before_anything_is_written(tmp_path, overrides, needle):
    c = _tiny()
    for k, v in overrides.items():
        _set(c, k, v)
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=".") as e:
        pipeline.run(c, str(wd))
    assert needle in str(e.value), str(e.value)
    assert not wd.exists()


def test_sample_out_dir_must_be_new_or_empty(tmp_path):
    c = _tiny()
    c.mode = "sample"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "00000.png").write_bytes(b"user file")
    c.sample.out_dir = str(tmp_path / "mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        validate(c, str(tmp_path / "wd"))
    assert (tmp_path / "mine" / "00000.png").read_bytes() == b"user file"


def test_shipped_configs_validate_and_phases():
    for mod in (base, sd15, sd15_cfg8, sdxl):
        c = mod.get_config()
        c.teacher.path = ""  # no SD folder here: everything else must hold
        with pytest.raises(ConfigError, match="config.teacher.path is empty"):
            validate(c, "/tmp/never")
    assert phases(_tiny()) == ("pairs", "train", "export", "stage2")
    c = mnist.get_config()
    assert validate(c, "/tmp/never")[:3] == ("pairs", "train", "export")  # world fields are filled later
    c.mode = "sample"
    assert phases(c) == ("sample",)
