"""The main job on the tiny config: every configs/*.py loads, the pairs phase runs, resumes, and refuses a
workdir that holds another configuration's pairs; bad modes/paths give clear errors."""

import glob
import importlib.util
import os

import pytest

from d2g_jax import pipeline
from d2g_jax.workdir import teacher_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads(path):
    name = os.path.splitext(os.path.basename(path))[0]
    if name != "__init__":
        assert _load(name).pairs.num_steps > 0


def _tiny(tmp_path):
    c = _load("tiny")
    c.pairs.num_pairs, c.pairs.num_steps, c.pairs.shard_size, c.pairs.batch_size = 16, 2, 8, 8
    return c


def test_tiny_pairs_phase_runs_and_resumes(tmp_path):
    c = _tiny(tmp_path)
    wd = str(tmp_path / "wd")
    m = pipeline.run_pairs(c, wd)
    assert m["complete"] and m["num_pairs"] == 16
    shards = sorted(f for f in os.listdir(os.path.join(wd, "pairs")) if f.endswith(".array_record"))
    assert len(shards) == 2
    before = {s: os.path.getmtime(os.path.join(wd, "pairs", s)) for s in shards}
    c.mode = "pairs"
    pipeline.run(c, wd)  # rerun: nothing regenerated
    assert {s: os.path.getmtime(os.path.join(wd, "pairs", s)) for s in shards} == before
    c.pairs.guidance_scale = 7.5
    with pytest.raises(ValueError, match="guidance_scale"):
        pipeline.run(c, wd)


def test_bad_mode_and_teacher_path(tmp_path):
    c = _tiny(tmp_path)
    c.mode = "sample"
    c.sample.prompts = str(tmp_path / "prompts.txt")  # both set: ambiguous
    with pytest.raises(ValueError, match="exactly one of config.sample.prompts"):
        pipeline.run(c, str(tmp_path))
    c.sample.prompts = c.sample.prompt = ""
    with pytest.raises(ValueError, match="exactly one of config.sample.prompts"):
        pipeline.run(c, str(tmp_path))
    c.mode = "eval"
    c.eval.metrics = "fid,nonsense"
    with pytest.raises(ValueError, match="unknown \\['nonsense'\\]"):
        pipeline.run(c, str(tmp_path))
    c.mode = "nonsense"
    with pytest.raises(ValueError, match="not a phase"):
        pipeline.run(c, str(tmp_path))
    c = _load("sd15")
    c.teacher.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        teacher_path(c, str(tmp_path))
