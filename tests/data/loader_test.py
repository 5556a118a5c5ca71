"""The grain loader over pair shards: global shuffle determinism, per-host disjointness (2 simulated hosts),
drop_remainder, epochs, iterator state save/restore (plain and through Orbax), global-array layout, and clear
errors for incomplete/mismatched/corrupt datasets. Shards come from `generate_pairs` with a toy teacher."""

import json
import os
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from d2g_jax.data.loader import PairsSource, make_global_batch, make_loader
from d2g_jax.data.pairs_writer import (
    MANIFEST,
    PairsError,
    decode_record,
    encode_record,
    generate_pairs,
    shard_name,
)

N = 21
PROMPTS = [f"prompt number {i}" for i in range(N)]


def _generate(out, teacher, **kw):
    args = dict(guidance_scale=2.0, num_steps=2, latent_size=(4, 4), seed=7, shard_size=5, batch_size=8)
    return generate_pairs(str(out), teacher, PROMPTS, **{**args, **kw})


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, toy_teacher_factory):
    out = tmp_path_factory.mktemp("loader") / "pairs"
    _generate(out, toy_teacher_factory("toy-v1"))
    return str(out)


def _indices(it, n):
    return [next(it)["index"].tolist() for _ in range(n)]


def _loader(pairs_dir, **kw):
    args = dict(global_batch_size=4, seed=0, shard_options=grain.sharding.NoSharding(), read_threads=2, prefetch=8)
    return make_loader(pairs_dir, **{**args, **kw})


def test_batches_hold_pairs(pairs_dir):
    batch = next(_loader(pairs_dir))
    assert batch["noise"].shape == batch["latent"].shape == (4, 4, 4, 4)
    assert batch["noise"].dtype == np.float32 and batch["index"].dtype == np.int64
    assert [str(p) for p in batch["prompt"]] == [PROMPTS[i] for i in batch["index"]]
    src = PairsSource(pairs_dir)
    np.testing.assert_array_equal(batch["latent"][1], src[int(batch["index"][1])]["latent"])


def test_shuffle_is_deterministic_and_epochs_reshuffle(pairs_dir):
    a, b = _indices(_loader(pairs_dir), 10), _indices(_loader(pairs_dir), 10)
    assert a == b
    assert a != _indices(_loader(pairs_dir, seed=1), 10)
    # 21 pairs, global batch 4 → 5 batches (20 pairs) per epoch, one pair dropped per epoch.
    e1, e2 = sum(a[:5], []), sum(a[5:10], [])
    assert len(set(e1)) == len(set(e2)) == 20 and e1 != e2
    assert e1 != sorted(e1)


def test_two_hosts_are_disjoint_and_form_the_global_batch(pairs_dir):
    glob = _indices(_loader(pairs_dir, global_batch_size=4, num_epochs=1), 5)
    hosts = [
        _indices(
            _loader(pairs_dir, global_batch_size=4, num_epochs=1, shard_options=grain.sharding.ShardOptions(h, 2)), 5
        )
        for h in (0, 1)
    ]
    for k in range(5):
        assert len(hosts[0][k]) == len(hosts[1][k]) == 2
        assert not set(hosts[0][k]) & set(hosts[1][k])
        assert sorted(hosts[0][k] + hosts[1][k]) == sorted(glob[k])  # local batches k = global batch k
    it = _loader(pairs_dir, global_batch_size=4, num_epochs=1, shard_options=grain.sharding.ShardOptions(1, 2))
    _indices(it, 5)
    with pytest.raises(StopIteration):  # both hosts stop after the same number of steps
        next(it)


def test_drop_remainder(pairs_dir):
    kept = list(_loader(pairs_dir, global_batch_size=8, num_epochs=1))
    assert [len(b["index"]) for b in kept] == [8, 8]
    full = list(_loader(pairs_dir, global_batch_size=8, num_epochs=1, drop_remainder=False))
    assert [len(b["index"]) for b in full] == [8, 8, 5]
    assert sorted(np.concatenate([b["index"] for b in full]).tolist()) == list(range(N))
    ordered = list(_loader(pairs_dir, global_batch_size=8, num_epochs=1, drop_remainder=False, shuffle=False))
    assert np.concatenate([b["index"] for b in ordered]).tolist() == list(range(N))
    with pytest.raises(PairsError, match="21 pairs < one global batch of 32"):
        _loader(pairs_dir, global_batch_size=32)
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        _loader(pairs_dir, global_batch_size=5, shard_options=grain.sharding.ShardOptions(0, 2))


def test_iterator_state_restores_the_continuation(pairs_dir, tmp_path):
    it = _loader(pairs_dir, shard_options=grain.sharding.ShardOptions(1, 2))
    _indices(it, 7)  # crosses the first epoch boundary
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = _indices(it, 6)
    fresh = _loader(pairs_dir, shard_options=grain.sharding.ShardOptions(1, 2))
    fresh.set_state(state)
    assert _indices(fresh, 6) == expected

    # Through Orbax with grain's checkpoint handler, as the train loop saves it next to the train state.
    it = _loader(pairs_dir)
    _indices(it, 3)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        expected = _indices(it, 4)
        restored = _loader(pairs_dir)
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert _indices(restored, 4) == expected


def test_global_batch_on_mesh(pairs_dir):
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    batch = next(_loader(pairs_dir, global_batch_size=8))
    g = make_global_batch(batch, mesh)
    assert isinstance(g["latent"], jax.Array) and g["latent"].shape == (8, 4, 4, 4)
    assert g["latent"].sharding == NamedSharding(mesh, P("data"))
    assert len({s.device for s in g["latent"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(g["latent"]), batch["latent"])
    assert isinstance(g["prompt"], np.ndarray)  # strings stay on the host


# ----------------------------------------------------------------------------------------------------------
# Errors name the file.


def _copy(pairs_dir, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(pairs_dir, dst)
    return dst


def test_manifest_errors(pairs_dir, tmp_path):
    with pytest.raises(PairsError, match=r"manifest\.json: missing"):
        PairsSource(str(tmp_path))
    with pytest.raises(PairsError, match=r"latent_shape is \[4, 4, 4\], expected \[64, 64, 4\]"):
        PairsSource(pairs_dir, expect={"latent_shape": (64, 64, 4)})
    with pytest.raises(PairsError, match="teacher is .*expected"):
        PairsSource(pairs_dir, expect={"teacher": {"toy": "other"}})
    PairsSource(pairs_dir, expect={"latent_shape": (4, 4, 4), "guidance_scale": 2.0, "teacher": {"toy": "toy-v1"}})

    incomplete = _copy(pairs_dir, tmp_path, "incomplete")
    m = json.loads((incomplete / MANIFEST).read_text())
    (incomplete / MANIFEST).write_text(json.dumps(dict(m, complete=False)))
    with pytest.raises(PairsError, match=r"manifest\.json: pair generation is not complete"):
        PairsSource(str(incomplete))
    missing = _copy(pairs_dir, tmp_path, "missing")
    os.remove(missing / shard_name(5, 10))
    with pytest.raises(PairsError, match=rf"{shard_name(5, 10)}: shard listed in .*manifest\.json is missing"):
        PairsSource(str(missing))


def test_shard_errors(pairs_dir, tmp_path, toy_teacher_factory):
    truncated = _copy(pairs_dir, tmp_path, "truncated")
    path = truncated / shard_name(10, 15)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PairsError, match=rf"{shard_name(10, 15)}: 0 records, expected 5"):
        PairsSource(str(truncated))

    # A shard from another dataset (another teacher) under the same name.
    other = tmp_path / "other"
    _generate(other, toy_teacher_factory("toy-v2"))
    foreign = _copy(pairs_dir, tmp_path, "foreign")
    shutil.copy(other / shard_name(0, 5), foreign / shard_name(0, 5))
    with pytest.raises(PairsError, match=rf"{shard_name(0, 5)}: record 0 is pair 0 of run \w+, expected pair 0 of"):
        PairsSource(str(foreign))

    # A flipped byte inside a record: ArrayRecord's chunk hash catches it when that record is read.
    corrupt = _copy(pairs_dir, tmp_path, "corrupt")
    path = corrupt / shard_name(15, 20)
    data = bytearray(path.read_bytes())
    pos = data.find(b"prompt number 17") + 200  # inside record 2's arrays (uncompressed, group_size 1)
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    src = PairsSource(str(corrupt))
    src[16]
    with pytest.raises(PairsError, match=rf"{shard_name(15, 20)} record 2: cannot read \(Corrupted Riegeli"):
        src[17]
    # Our own CRC covers what the container does not (e.g. a record rewritten with a damaged payload).
    good = encode_record(3, "p", np.zeros((2, 2, 1), np.float32), np.ones((2, 2, 1), np.float32), "run")
    bad = bytearray(good)
    bad[good.find(np.float32(1).tobytes())] ^= 0x01
    assert decode_record(good)["index"] == 3
    with pytest.raises(PairsError, match=r"x\.array_record record 5: CRC mismatch"):
        decode_record(bytes(bad), "x.array_record record 5")
