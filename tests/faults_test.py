"""Faults and bad input on a finished tiny run (issue 15): a damaged newest checkpoint is named, moved aside and the
previous one resumed; a refused value leaves no run.json, so the corrected command runs; a NaN stop names the
command that continues with a lower learning rate (`resume_changes`), which then resumes from the last good step; a
failed checkpoint save stops the run at that step with the cause last; metrics.jsonl keeps each step once after a
resume; a damaged shard record is found by `pairs.verify=full` with the shard to delete.

Changed bytes (issue 24): a checkpoint whose data chunk changed after it was written (stage 1 and stage 2) fails its
digest record, is moved aside and the run walks back and continues bit-identically to the uninterrupted run; the
only checkpoint damaged is refused naming the file; a damaged export is refused by sample naming the file; a
checkpoint without a record (older runs, a kill between commit and record) is restored with a warning;
`--config.mode=verify` prints the table and fails on damage; a NaN soon after an unverified restore names the
checkpoint and the verify command first."""

import glob
import json
import logging as std_logging
import os
import shutil

import jax
import pytest

from configs import tiny
from d2g_jax import pipeline
from d2g_jax.data.pairs_writer import PairsError
from d2g_jax.export import ExportError
from d2g_jax.train import checkpoint as ckpt
from d2g_jax.train import integrity
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


# --- changed bytes (issue 24) ---


def _flip(ck, n=4096):
    """Flips `n` bytes in the middle of the largest data file of a checkpoint (what a failing disk or a bad copy
    leaves: Orbax still reads it, as valid-looking floats). Returns the file."""
    f = max(glob.glob(os.path.join(ck, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
    with open(f, "r+b") as fh:
        size = os.path.getsize(f)
        n = min(n, size // 2)
        fh.seek(size // 2 - n // 2)
        data = fh.read(n)
        fh.seek(size // 2 - n // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    return f


def _state_leaves(ck):
    import orbax.checkpoint as ocp

    return jax.tree.leaves(ocp.StandardCheckpointer().restore(os.path.join(ck, "state")))


def _assert_same_checkpoint(a, b):
    import numpy as np

    for x, y in zip(_state_leaves(a), _state_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_records_are_written_after_each_save(finished):
    for step in ("2", "4"):
        folder = os.path.join(finished, "stage1", "checkpoints", step)
        record = json.load(open(os.path.join(folder, integrity.RECORD)))
        assert record["step"] == int(step) and set(record["files"]) == set(integrity.tree_files(folder))
        assert integrity.check_folder(folder) == integrity.VERIFIED
    info = json.load(open(os.path.join(finished, "export", "step_00000004", "export.json")))
    assert "unet/diffusion_pytorch_model.safetensors" in info["digests"]["files"]


def test_changed_bytes_walk_back_and_continue_bit_identically(finished, tmp_path, caplog):
    """The issue's scenario: bytes changed inside a data chunk of the newest checkpoint, then the run continued.
    The digest check names the file, moves the step aside, walks back to step 2, and the replayed steps end
    bit-identical to the uninterrupted run (its checkpoint 4 and metrics)."""
    wd = _copy(finished, tmp_path)
    cks = os.path.join(wd, "stage1", "checkpoints")
    bad = _flip(os.path.join(cks, "4"))
    pipeline.run(_config(), wd)
    names = sorted(os.listdir(cks))
    assert names[:2] == ["2", "4"] and names[2].startswith("4.corrupt-") and len(names) == 3
    lines = [r.getMessage() for r in caplog.records if "unreadable (damaged" in r.getMessage()]
    assert len(lines) == 1 and os.path.basename(bad) in lines[0] and "its bytes changed" in lines[0], lines
    assert "walking back" in lines[0]
    _assert_same_checkpoint(os.path.join(cks, "4"), os.path.join(finished, "stage1", "checkpoints", "4"))
    assert open(os.path.join(wd, "stage1", "metrics.jsonl")).read() == open(
        os.path.join(finished, "stage1", "metrics.jsonl")).read()  # fmt: skip
    assert integrity.check_folder(os.path.join(cks, "4")) == integrity.VERIFIED  # the new step 4 has its record


def test_damaged_only_checkpoint_is_refused_naming_the_file(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    cks = os.path.join(wd, "stage1", "checkpoints")
    shutil.rmtree(os.path.join(cks, "4"))
    bad = os.path.basename(_flip(os.path.join(cks, "2")))
    with pytest.raises(ckpt.CheckpointError, match=rf"no readable checkpoint.*step 2 \(damaged: .*{bad}: its bytes "
                                                   "changed.*Copy an intact checkpoint back"):  # fmt: skip
        _trainer(wd).restore_or_init()
    assert [n.startswith("2.corrupt-") for n in os.listdir(cks)] == [True]  # moved aside, never deleted


def test_checkpoint_without_record_is_restored_with_a_warning(finished, tmp_path, caplog):
    wd = _copy(finished, tmp_path)
    folder = os.path.join(wd, "stage1", "checkpoints", "4")
    os.remove(os.path.join(folder, integrity.RECORD))  # a run older than the records
    tr = _trainer(wd)
    assert int(jax.device_get(tr.restore_or_init().step)) == 4
    assert [r for r in caplog.records if "has no digest record" in r.getMessage() and "/4 " in r.getMessage()]
    tr.mgr.close()


def test_a_kill_between_commit_and_record_leaves_a_restorable_run(finished, tmp_path, monkeypatch, caplog):
    """The record is written after Orbax's commit, atomically: a kill half-way through it leaves a committed step,
    a partial temporary file and no record; that step is restored (unverified), the temporary file is ignored."""
    wd = _copy(finished, tmp_path)
    cks = os.path.join(wd, "stage1", "checkpoints")
    shutil.rmtree(os.path.join(cks, "4"))
    real = integrity.files.atomic_write_json

    def killed(path, obj, **kw):
        if os.path.isdir(os.path.join(cks, "4")) and path.startswith(os.path.join(cks, "4")):
            with open(f"{path}.{os.getpid()}.1.tmp", "w") as f:
                f.write(json.dumps(obj)[:100])  # the process dies here: a partial temp file, never renamed
            raise SystemError("killed")
        return real(path, obj, **kw)

    monkeypatch.setattr(integrity.files, "atomic_write_json", killed)
    with pytest.raises(ckpt.CheckpointError, match="killed"):
        pipeline.run(_config(), wd)
    monkeypatch.setattr(integrity.files, "atomic_write_json", real)
    folder = os.path.join(cks, "4")
    assert os.path.isfile(os.path.join(folder, "state", "_METADATA"))  # committed by Orbax
    assert not os.path.exists(os.path.join(folder, integrity.RECORD))
    assert integrity.check_folder(folder) == integrity.UNVERIFIED
    tr = _trainer(wd)
    assert int(jax.device_get(tr.restore_or_init().step)) == 4
    tr.mgr.close()
    _assert_same_checkpoint(folder, os.path.join(finished, "stage1", "checkpoints", "4"))


def test_sample_refuses_a_damaged_export_naming_the_file(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    weights = os.path.join(wd, "export", "step_00000004", "unet", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) // 2)
        f.write(b"\0" * 4096)
    c = _config()
    c.mode = "sample"
    with pytest.raises(ExportError, match=r"diffusion_pytorch_model.safetensors: its bytes changed.*Delete .*"
                                          r"step_00000004.*--config.mode=export"):  # fmt: skip
        pipeline.run(c, wd)
    assert not os.path.exists(os.path.join(wd, "samples"))


def test_verify_mode_prints_the_table_and_fails_on_damage(finished, tmp_path, caplog):
    wd = _copy(finished, tmp_path)
    c = _config()
    c.mode = "verify"
    rows = pipeline.run_verify(c, wd)
    assert [r["status"] for r in rows] == ["verified"] * 5  # checkpoints 2 and 4, the export, 2 pair shards
    os.remove(os.path.join(wd, "stage1", "checkpoints", "2", integrity.RECORD))
    bad = os.path.basename(_flip(os.path.join(wd, "stage1", "checkpoints", "4")))
    with caplog.at_level(std_logging.INFO, logger="absl"):
        with pytest.raises(pipeline.VerifyError, match=rf"1 damaged.*stage1 checkpoint 4: .*{bad}"):
            pipeline.run(c, wd)
    table = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"verify {wd}")][-1]
    assert "1 unverified" in table and "1 damaged" in table and "3 verified" in table
    assert sorted(os.listdir(os.path.join(wd, "stage1", "checkpoints"))) == ["2", "4"]  # verify moves nothing
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "d2g_jax.main", "--config=configs/tiny.py", f"--workdir={wd}",
                        "--config.mode=verify"], cwd=root, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 1 and "1 damaged" in out[-1] and bad in out[-1], "\n".join(out[-20:])
    assert any("stage1 checkpoint 2" in ln and "unverified" in ln for ln in out)


def test_nan_soon_after_an_unverified_restore_names_the_checkpoint_first(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(wd, "stage1", "checkpoints", "4"))
    os.remove(os.path.join(wd, "stage1", "checkpoints", "2", integrity.RECORD))  # restored unverified
    blowup = _config(lr=1e30, lr_end=1e29)
    blowup.resume_changes = "train.lr,train.lr_end"
    with pytest.raises(NonFiniteError) as e:
        pipeline.run(blowup, wd)
    msg = str(e.value)
    assert "after resuming from step 2, which has no digest record" in msg and "may be damaged" in msg
    assert msg.index("--config.mode=verify") < msg.index("--config.train.lr=1e+29")  # the checkpoint first


@pytest.fixture(scope="module")
def stage2_finished(finished, tmp_path_factory):
    """The finished stage-1 run continued by 4 stage-2 steps (checkpoints 2 and 4 of stage 2)."""
    wd = str(tmp_path_factory.mktemp("faults_s2") / "run")
    shutil.copytree(finished, wd)
    c = _stage2_config()
    pipeline.run(c, wd)
    assert sorted(os.listdir(os.path.join(wd, "stage2", "checkpoints"))) == ["2", "4"]
    return wd


def _stage2_config():
    c = _config()
    c.stage2.num_steps, c.stage2.ckpt_every, c.stage2.log_every = 4, 2, 1
    c.stage2.eval_every = c.stage2.sample_every = 0
    c.train.async_ckpt = True  # (shared by stage 2) the record of an asynchronous save
    c.disc.r1_interval = 2
    c.resume_changes = "stage2.num_steps,disc.r1_interval"
    return c


@pytest.mark.slow  # a tiny stage-2 compile, twice (~2 min on 2 shared cores)
def test_stage2_changed_bytes_walk_back_and_continue_bit_identically(stage2_finished, tmp_path, caplog):
    wd = _copy(stage2_finished, tmp_path)
    cks = os.path.join(wd, "stage2", "checkpoints")
    assert integrity.check_folder(os.path.join(cks, "4")) == integrity.VERIFIED
    bad = os.path.basename(_flip(os.path.join(cks, "4")))
    pipeline.run(_stage2_config(), wd)
    assert [r for r in caplog.records if "unreadable (damaged" in r.getMessage() and bad in r.getMessage()]
    assert sorted(os.listdir(cks))[2].startswith("4.corrupt-")
    _assert_same_checkpoint(os.path.join(cks, "4"), os.path.join(stage2_finished, "stage2", "checkpoints", "4"))
    assert open(os.path.join(wd, "stage2", "metrics.jsonl")).read() == open(
        os.path.join(stage2_finished, "stage2", "metrics.jsonl")).read()  # fmt: skip
