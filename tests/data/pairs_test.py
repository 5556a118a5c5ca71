"""`generate_pairs` with a tiny real SD pipeline: kill + resume gives exactly the uninterrupted run's pairs
(bit for bit, each index once), simulated multi-process runs, configuration mismatches, corrupt shards, and
noise/latent regeneration of single pairs."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from jax.sharding import Mesh

from d2g_jax.data.pairs_writer import (
    MANIFEST,
    PairsError,
    decode_record,
    generate_pairs,
    pair_noise,
    read_manifest,
    regenerate_pairs,
    shard_name,
)

PROMPTS = ["a cat", "a dog", "cat dog", "a photo", "dog", "cat", "the cat", "a dog cat"]
N, SHARD, BATCH = 20, 6, 2  # shards [0,6) [6,12) [12,18) [18,20); 3 batches per full shard
ARGS = dict(guidance_scale=3.0, num_steps=3, latent_size=(8, 8), seed=1234, num_pairs=N, shard_size=SHARD,
            batch_size=BATCH)  # fmt: skip


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(jax.devices()[:2]), ("data",))  # batch of 2 → one pair per device


def _run(out, teacher, mesh, **kw):
    return generate_pairs(str(out), teacher, PROMPTS, mesh=mesh, **{**ARGS, **kw})


def _records(out) -> dict[int, bytes]:
    """index → raw record bytes over all finished shards; asserts every index appears once."""
    out_map = {}
    for f in sorted(os.listdir(out)):
        if not f.endswith(".array_record"):
            continue
        r = ArrayRecordReader(os.path.join(out, f))
        for data in r.read_all():
            i = decode_record(data)["index"]
            assert i not in out_map, f"pair {i} duplicated ({f})"
            out_map[i] = data
        r.close()
    return out_map


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, mesh):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    manifest = _run(out, tiny_teacher, mesh)
    return out, manifest


def test_uninterrupted_run(reference):
    out, manifest = reference
    assert manifest["complete"] and read_manifest(str(out)) == manifest
    assert [s["file"] for s in manifest["shards"]] == [shard_name(a, b) for a, b in ((0, 6), (6, 12), (12, 18),
                                                                                       (18, 20))]  # fmt: skip
    recs = _records(out)
    assert sorted(recs) == list(range(N))
    r = decode_record(recs[9])
    assert r["prompt"] == PROMPTS[9 % len(PROMPTS)] and r["noise"].shape == r["latent"].shape == (8, 8, 4)
    assert r["noise"].dtype == r["latent"].dtype == np.float32 and np.isfinite(r["latent"]).all()
    assert not any(f.endswith(".tmp") for f in os.listdir(out))


class _FailingText:
    """Wraps the teacher's conditioner and raises on the n-th `encode` call (a crash in mid-shard)."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def encode(self, prompts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Killed("simulated crash")
        return self.inner.encode(prompts)

    def encode_negative(self, batch):
        return self.inner.encode_negative(batch)


def test_kill_and_resume_is_bit_identical(reference, tiny_teacher, mesh, tmp_path, caplog):
    ref_out, _ = reference
    out = tmp_path / "pairs"

    def kill_after_first(path):
        raise Killed(path)

    # 1) killed right after the first shard's rename.
    with pytest.raises(Killed):
        _run(out, tiny_teacher, mesh, on_shard_done=kill_after_first)
    assert not read_manifest(str(out))["complete"]
    # 2) killed in the middle of the second shard: 2 of its 3 batches written into the .tmp.
    failing = tiny_teacher.__class__(**{**tiny_teacher.__dict__, "text": _FailingText(tiny_teacher.text, 3)})
    with pytest.raises(Killed):
        _run(out, failing, mesh)
    tmp = out / (shard_name(6, 12) + ".tmp")
    assert tmp.exists() and not (out / shard_name(6, 12)).exists()
    # 3) a partial shard left by some other killed process.
    (out / (shard_name(18, 20) + ".tmp")).write_bytes(b"\x00partial")
    assert sorted(_records(out)) == list(range(6))  # only the finished shard counts

    with caplog.at_level(logging.INFO):
        manifest = _run(out, tiny_teacher, mesh, log_every_s=0.0)
    assert "pairs/s" in caplog.text and "ETA" in caplog.text
    assert manifest["complete"]
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    ref, got = _records(ref_out), _records(out)
    assert sorted(got) == list(range(N))
    assert all(got[i] == ref[i] for i in range(N)), "resumed pairs differ from the uninterrupted run"
    # A rerun of a finished directory is a no-op.
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f != MANIFEST}
    _run(out, tiny_teacher, mesh, on_shard_done=kill_after_first)
    assert before == {f: os.path.getmtime(out / f) for f in os.listdir(out) if f != MANIFEST}


def test_two_processes_write_disjoint_shards(reference, tiny_teacher, mesh, tmp_path):
    out = tmp_path / "pairs"
    written = {0: [], 1: []}
    m1 = _run(out, tiny_teacher, mesh, process_index=1, process_count=2, on_shard_done=written[1].append)
    assert not m1["complete"]  # process 0 has not run yet
    m0 = _run(out, tiny_teacher, mesh, process_index=0, process_count=2, on_shard_done=written[0].append)
    assert m0["complete"] and read_manifest(str(out))["complete"]
    names = {k: [os.path.basename(p) for p in v] for k, v in written.items()}
    assert names == {0: [shard_name(0, 6), shard_name(6, 12)], 1: [shard_name(12, 18), shard_name(18, 20)]}
    assert _records(out) == _records(reference[0])


def test_mismatched_configuration_is_refused(reference, tiny_teacher, mesh, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "pairs"
    shutil.copytree(ref_out, out)
    snapshot = {f: (out / f).read_bytes() for f in os.listdir(out)}
    for change, pattern in (
        (dict(guidance_scale=8.0), r"guidance_scale: 3\.0 → 8\.0"),
        (dict(seed=1), r"seed: 1234 → 1"),
        (dict(num_steps=4), r"num_steps: 3 → 4"),
        (dict(latent_size=(8, 16)), r"latent_shape"),
    ):
        with pytest.raises(PairsError, match=rf"manifest\.json: this folder holds pairs of a different .*{pattern}"):
            _run(out, tiny_teacher, mesh, **change)
    other = tiny_teacher.__class__(**{**tiny_teacher.__dict__, "fingerprint": {"configs_sha256": "x"}})
    with pytest.raises(PairsError, match="teacher:"):
        _run(out, other, mesh)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == snapshot  # nothing overwritten

    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(out / shard_name(0, 6), stray / shard_name(0, 6))
    with pytest.raises(PairsError, match=r"holds shard files \(pairs-0000000000-0000000006.array_record"):
        _run(stray, tiny_teacher, mesh)


def test_corrupt_finished_shard_is_reported(reference, tiny_teacher, mesh, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(reference[0], out)
    path = out / shard_name(6, 12)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PairsError, match=rf"{shard_name(6, 12)}: 0 records, expected 6 .*delete it"):
        _run(out, tiny_teacher, mesh)


def test_single_pairs_regenerate_exactly(reference, tiny_teacher, mesh):
    recs = _records(reference[0])
    idx = [13, 0, 19]
    args = {k: ARGS[k] for k in ("guidance_scale", "num_steps", "latent_size", "seed", "batch_size", "num_pairs", "shard_size")}
    again = regenerate_pairs(tiny_teacher, PROMPTS, idx, mesh=mesh, **args)
    for k, i in enumerate(idx):
        r = decode_record(recs[i])
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(ARGS["seed"]), i), (8, 8, 4))
        np.testing.assert_array_equal(r["noise"], np.asarray(noise))
        np.testing.assert_array_equal(pair_noise(ARGS["seed"], np.array([5, i], np.uint32), (8, 8, 4))[1], noise)
        np.testing.assert_array_equal(again["noise"][k], r["noise"])
        np.testing.assert_array_equal(again["latent"][k], r["latent"])  # same compiled program and layout
        assert again["prompt"][k] == r["prompt"]


def test_bad_arguments(tiny_teacher, mesh, tmp_path):
    with pytest.raises(PairsError, match="batch_size 3 is not a multiple of the mesh's data axis"):
        _run(tmp_path / "a", tiny_teacher, mesh, batch_size=3)
    with pytest.raises(PairsError, match="must be positive"):
        _run(tmp_path / "b", tiny_teacher, mesh, shard_size=0)
    with pytest.raises(PairsError, match="not a version-1 pair record"):
        decode_record(b"\x93\x01\x02\x03", "x.array_record record 0")
