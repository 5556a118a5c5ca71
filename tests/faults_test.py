"""Faults and bad input on a finished tiny run (issue 15): a damaged newest checkpoint is named, moved aside and the
previous one resumed; a refused value leaves no run.json, so the corrected command runs; a NaN stop names the
command that continues with a lower learning rate (`resume_changes`), which then resumes from the last good step; a
failed checkpoint save stops the run at that step with the cause last; metrics.jsonl keeps each step once after a
resume; a damaged shard record is found by `pairs.verify=full` with the shard to delete."""

import glob
import json
import os
import shutil

import jax
import pytest

from configs import tiny
from d2g_jax import pipeline
from d2g_jax.data.pairs_writer import PairsError
from d2g_jax.train import checkpoint as ckpt
from d2g_jax.train.trainer import NonFiniteError, Trainer
from d2g_jax.validate import ConfigError


def _config(**train):
    c = tiny.get_config()
    c.pairs.num_pairs, c.pairs.num_steps, c.pairs.shard_size = 16, 2, 8
    c.train.num_steps, c.train.ckpt_every, c.train.log_every, c.train.keep = 4, 2, 1, 5
    c.train.eval_every = c.train.sample_every = 0
    c.train.holdout, c.train.async_ckpt = 4, False
    c.stage2.num_steps = 0
    c.loss.kind = "mse"  # faults do not depend on the loss; a smaller program to compile
    c.mode = "train"
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run refused once for a bad value (nothing written), then run correctly: checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("faults")
    wd = str(root / "run")
    bad = _config(num_steps=0)
    bad.mode = "all"
    with pytest.raises(ConfigError, match="config.train.num_steps=0"):
        pipeline.run(bad, wd)
    assert not os.path.exists(wd)  # nothing claimed the workdir
    c = _config()
    c.mode = "all"
    pipeline.run(c, wd)  # the corrected command
    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints"))) == ["2", "4"]
    return wd


def _copy(finished, tmp_path, name="copy"):
    wd = str(tmp_path / name)
    shutil.copytree(finished, wd)
    return wd


def _trainer(wd):
    return Trainer(_config(), wd, os.path.join(wd, "tiny_teacher"), os.path.join(wd, "pairs"))


def _damage(ck, how):
    if how == "truncated data file":
        f = max(glob.glob(os.path.join(ck, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    elif how == "no _METADATA":
        os.remove(os.path.join(ck, "state", "_METADATA"))
    elif how == "empty iterator state":
        open(glob.glob(os.path.join(ck, "data", "*.json"))[0], "w").close()
    elif how == "no state item":
        shutil.rmtree(os.path.join(ck, "state"))


@pytest.mark.parametrize("how", ["truncated data file", "no _METADATA", "empty iterator state", "no state item"])
def test_damaged_latest_checkpoint_walks_back(finished, tmp_path, how, caplog):
    wd = _copy(finished, tmp_path)
    cks = os.path.join(wd, "stage1", "checkpoints")
    _damage(os.path.join(cks, "4"), how)
    tr = _trainer(wd)
    state = tr.restore_or_init()
    assert int(jax.device_get(state.step)) == 2
    names = sorted(os.listdir(cks))
    assert names[0] == "2" and names[1].startswith("4.corrupt-") and len(names) == 2
    assert any("checkpoint" in r.getMessage() and "/4 unreadable" in r.getMessage() for r in caplog.records)
    tr.mgr.close()


def test_no_readable_checkpoint_is_refused_naming_each(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    cks = os.path.join(wd, "stage1", "checkpoints")
    _damage(os.path.join(cks, "4"), "no state item")
    _damage(os.path.join(cks, "2"), "no _METADATA")
    with pytest.raises(ckpt.CheckpointError, match=r"no readable checkpoint.*step 4 .*step 2 "):
        _trainer(wd).restore_or_init()
    assert all(".corrupt-" in n for n in os.listdir(cks))  # moved aside, never deleted


def test_export_walks_back_too(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(wd, "export"))  # not exported yet
    _damage(os.path.join(wd, "stage1", "checkpoints", "4"), "no state item")  # (a partial EMA restore reads past
    # the other damage kinds: they hit other arrays or only the tree metadata, and the EMA is still exact)
    c = _config()
    c.mode = "export"
    pipeline.run(c, wd)
    assert os.path.isfile(os.path.join(wd, "export", "step_00000002", "export.json"))


def test_metrics_jsonl_keeps_each_step_once_after_resume(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    path = os.path.join(wd, "stage1", "metrics.jsonl")
    rows = [json.loads(x) for x in open(path)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    shutil.rmtree(os.path.join(wd, "stage1", "checkpoints", "4"))  # killed after logging steps 3, 4 (no ckpt 4)
    tr = _trainer(wd)
    tr.restore_or_init()
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2]
    tr.mgr.close()


def test_nan_stop_then_the_suggested_resume_changes_continues(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(wd, "stage1", "checkpoints", "4"))
    blowup = _config(lr=1e30, lr_end=1e29)
    with pytest.raises(ckpt.RunMismatchError, match="--config.resume_changes=train.lr"):
        pipeline.run(blowup, wd)  # an identity field changed without saying so: refused, with the way to say so
    blowup.resume_changes = "train.lr,train.lr_end"
    with pytest.raises(NonFiniteError) as e:
        pipeline.run(blowup, wd)
    msg = str(e.value)
    assert "The last good checkpoint is step" in msg and "--config.train.lr=1e+29" in msg
    assert "--config.resume_changes=train.lr" in msg
    good = _config()
    good.resume_changes = "train.lr,train.lr_end"
    pipeline.run(good, wd)  # the lower learning rate, accepted deliberately: continues from the last good step
    run = json.load(open(os.path.join(wd, "run.json")))
    assert run["train.lr"] == good.train.lr and len(run["_history"]) == 2
    assert run["_history"][0]["changes"]["train.lr"] == [1e-4, 1e30] and run["_history"][0]["from_step"] == 2
    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints")))[-1] == "4"
    steps = [json.loads(x)["step"] for x in open(os.path.join(wd, "stage1", "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_failed_save_stops_at_that_step_with_the_cause_last(finished, tmp_path, monkeypatch):
    wd = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(wd, "stage1", "checkpoints", "4"))
    real_save = ckpt.save

    def full_disk(mgr, step, state, iterator):
        if step == 4:
            raise OSError(28, "No space left on device")
        return real_save(mgr, step, state, iterator)

    monkeypatch.setattr(ckpt, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError) as e:
        pipeline.run(_config(), wd)
    assert "saving checkpoint step 4" in str(e.value) and "training stopped at step 4" in str(e.value)
    assert str(e.value).endswith("No space left on device")
    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints"))) == ["2"]


def test_failed_async_save_stops_at_the_next_step(finished, tmp_path, monkeypatch):
    wd = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(wd, "stage1", "checkpoints", "4"))
    c = _config(num_steps=6, ckpt_every=3)
    c.resume_changes = "train.num_steps,train.ckpt_every"
    saved = []
    real_save, real_check = ckpt.save, ckpt.check_saves

    def remember(mgr, step, state, iterator):
        saved.append(step)
        return real_save(mgr, step, state, iterator)

    def background_failure(mgr):
        if saved and saved[-1] == 3:  # the save of step 3 failed in the background
            raise OSError(28, "No space left on device")
        return real_check(mgr)

    monkeypatch.setattr(ckpt, "save", remember)
    monkeypatch.setattr(ckpt, "check_saves", background_failure)
    with pytest.raises(ckpt.CheckpointError) as e:
        pipeline.run(c, wd)
    assert "training stopped at step 4" in str(e.value) and str(e.value).endswith("No space left on device")


def test_pairs_verify_full_finds_a_damaged_record(finished, tmp_path):
    """A shard whose middle record's bytes changed (its checksum no longer matches) passes the quick check but not
    `pairs.verify=full`, which names the shard, the record and the fix."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from d2g_jax.data.pairs_writer import WRITER_OPTIONS

    wd = _copy(finished, tmp_path)
    shard = sorted(glob.glob(os.path.join(wd, "pairs", "*.array_record")))[0]
    reader = ArrayRecordReader(shard)
    records = [bytes(r) for r in reader.read(list(range(reader.num_records())))]
    reader.close()
    bad = bytearray(records[3])
    bad[-20] ^= 0xFF  # a byte of the latent array: the record's CRC-32 no longer matches
    records[3] = bytes(bad)
    os.remove(shard)
    writer = ArrayRecordWriter(shard, WRITER_OPTIONS)
    for r in records:
        writer.write(r)
    writer.close()
    c = _config()
    c.mode = "pairs"
    pipeline.run(c, wd)  # the quick check (count, first and last record) finds the shard complete
    c.pairs.verify = "full"
    name = os.path.basename(shard)
    with pytest.raises(PairsError, match=rf"{name}: record 3 is damaged.*Delete .*{name}"):
        pipeline.run(c, wd)
    assert os.path.isfile(shard)  # named, not deleted: the user deletes it
