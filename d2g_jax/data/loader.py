"""grain input pipeline over the ODE pair shards written by `pairs_writer` (paper §3.1: training randomly samples
(noise, prompt, latent) pairs; Table A1 batch sizes 256 / 2048→1024 / 1024→512).

Pipeline (all index arithmetic, so it is deterministic, resumable and identical on every host):

    PairsSource (pair i = record i, decoded + checked)
      → shuffle(seed)                        one global permutation per epoch (reseeded each epoch)
      → [: N − N mod G]  (drop_remainder)     every global batch of G pairs is full
      → [host::num_hosts]                     host h takes positions h, h+P, ...: disjoint, and global batch k
                                              is exactly the union of the hosts' local batches k
      → batch(G / num_hosts) → repeat(num_epochs) → to_iter_dataset (prefetch threads)

Batches are dicts: `noise`, `latent` `[b, h, w, c]` float32, `index` `[b]` int64, `prompt` `[b]` numpy str.
`make_global_batch` lays a host-local batch out as a global `jax.Array` sharded on the mesh's `data` axis
(`jax.make_array_from_process_local_data`). The iterator is a `grain.DatasetIterator`: `get_state()`/
`set_state()` (JSON-able dicts) restore the exact continuation; it also plugs into Orbax via
`grain.checkpoint.CheckpointSave/CheckpointRestore` or the iterator's own `save`/`load`.

Every problem names its file: missing/incomplete manifest, manifest not matching the expected teacher or
latent shape, missing/truncated/foreign shards (checked when opening), corrupt records (checked on read: CRC,
run id, index, shape).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from d2g_jax.data.pairs_writer import MANIFEST, PairsError, decode_record, read_manifest, verify_shard


class PairsSource:
    """Random access to the pairs of one directory: `source[i]` is pair i (grain `RandomAccessDataSource`).

    Records are decoded and checked on every read (CRC, run id, index = i, noise/latent shape); errors name the
    shard file. Picklable (grain worker processes reopen the files).
    """

    def __init__(self, data_dir: str, *, expect: Mapping[str, Any] | None = None, verify: bool = True):
        """Opens `data_dir`, checks its manifest (and `expect`, see `check_identity`) and, with `verify`, each
        shard's record count and first/last records."""
        self.data_dir = data_dir
        manifest = read_manifest(data_dir)
        path = os.path.join(data_dir, MANIFEST)
        if manifest is None:
            raise PairsError(f"{path}: missing; {data_dir} is not a pair directory written by generate_pairs.")
        if not manifest.get("complete"):
            raise PairsError(f"{path}: pair generation is not complete (`complete` is false); rerun generate_pairs "
                             "with the same arguments to finish it.")  # fmt: skip
        check_identity(manifest, expect, path)
        self.manifest = manifest
        self.run_id = manifest["run_id"]
        self.shape = tuple(manifest["identity"]["latent_shape"])
        shards = manifest["shards"]
        self.paths = [os.path.join(data_dir, s["file"]) for s in shards]
        self.starts = [s["start"] for s in shards]
        expected_start = 0
        for s, p in zip(shards, self.paths):
            if s["start"] != expected_start or s["end"] <= s["start"]:
                raise PairsError(f"{path}: shard list is not a contiguous partition of the indices (at {s['file']}).")
            expected_start = s["end"]
            if not os.path.isfile(p):
                raise PairsError(f"{p}: shard listed in {path} is missing.")
            if verify:
                verify_shard(p, s["start"], s["end"], self.run_id)
        if expected_start != manifest["num_pairs"]:
            raise PairsError(f"{path}: shards cover {expected_start} pairs, manifest says {manifest['num_pairs']}.")
        self._source = None

    def _reader(self) -> grain.sources.ArrayRecordDataSource:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        return {k: (None if k == "_source" else v) for k, v in self.__dict__.items()}

    def __len__(self) -> int:
        return int(self.manifest["num_pairs"])

    def __repr__(self) -> str:
        return f"PairsSource({self.data_dir!r}, run_id={self.run_id})"

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        k = bisect.bisect_right(self.starts, i) - 1
        where = f"{self.paths[k]} record {i - self.starts[k]}"
        try:
            data = self._reader()[i]
        except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
            raise PairsError(f"{where}: cannot read ({e}).") from e
        r = decode_record(data, where)
        if r["run"] != self.run_id or r["index"] != i:
            raise PairsError(f"{where}: holds pair {r['index']} of run {r['run']}, expected pair {i} of run "
                             f"{self.run_id}.")  # fmt: skip
        for key in ("noise", "latent"):
            if r[key].shape != self.shape:
                raise PairsError(f"{where}: {key} shape {r[key].shape}, manifest says {self.shape}.")
        return {"noise": r["noise"], "latent": r["latent"], "index": np.int64(i), "prompt": r["prompt"]}


def check_identity(manifest: Mapping[str, Any], expect: Mapping[str, Any] | None, where: str = MANIFEST) -> None:
    """Raises `PairsError` naming `where` and the field if any `expect` entry differs from the manifest identity.

    `expect` keys are identity fields, e.g. `{"latent_shape": (64, 64, 4), "guidance_scale": 8.0,
    "teacher": pipeline_fingerprint(sd15_folder)}`; sequences compare as lists.
    """
    identity = manifest.get("identity", {})
    for key, want in (expect or {}).items():
        if key not in identity:
            raise PairsError(f"{where}: identity has no field {key!r} (has {sorted(identity)}).")
        have = identity[key]
        want_n = list(want) if isinstance(want, tuple) else want
        if have != want_n:
            raise PairsError(f"{where}: {key} is {have!r}, expected {want_n!r} (pairs of another teacher/config).")


def pairs_dataset(
    source: PairsSource,
    *,
    global_batch_size: int,
    seed: int,
    shard_options: grain.sharding.ShardOptions | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    limit: int | None = None,
) -> grain.MapDataset:
    """The batched per-host `MapDataset` (see the module docstring).

    Args:
      source: the pairs. global_batch_size: G, pairs per step over all hosts.
      seed: shuffle seed (the same on every host). shuffle: False keeps index order (evaluation).
      shard_options: this host's shard (default `ShardByJaxProcess()`): local batch = G / shard_count.
      drop_remainder: drop the N mod G pairs at the end of each (shuffled) epoch so every step has G pairs
        and all hosts the same number of steps. False keeps a last smaller batch (single host/eval only).
      num_epochs: None repeats forever (each epoch reshuffled).
      limit: use only pairs [0, limit) (the trainer holds the last pairs out for evaluation).
    """
    opts = shard_options or grain.sharding.ShardByJaxProcess()
    if global_batch_size <= 0 or global_batch_size % opts.shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the number of "
                         f"hosts ({opts.shard_count}).")  # fmt: skip
    ds = grain.MapDataset.source(source)
    if limit is not None:
        if not 0 < limit <= len(ds):
            raise PairsError(f"{source.data_dir}: cannot use the first {limit} of {len(ds)} pairs.")
        ds = ds[:limit]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if drop_remainder:
        keep = len(ds) // global_batch_size * global_batch_size
        if keep == 0:
            raise PairsError(f"{source.data_dir}: {len(ds)} pairs < one global batch of {global_batch_size}.")
        ds = ds[:keep]
    ds = ds[opts.shard_index :: opts.shard_count]
    ds = ds.batch(global_batch_size // opts.shard_count, drop_remainder=drop_remainder)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds


def make_loader(
    data_dir: str | PairsSource,
    *,
    global_batch_size: int,
    seed: int,
    shard_options: grain.sharding.ShardOptions | None = None,
    expect: Mapping[str, Any] | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    limit: int | None = None,
    read_threads: int = 16,
    prefetch: int = 256,
) -> grain.DatasetIterator:
    """Opens `data_dir` (or takes an already opened `PairsSource`) and returns the checkpointable iterator of
    host-local batches.

    `expect`: identity fields the pairs must have (see `check_identity`). `read_threads`/`prefetch`: grain
    `ReadOptions` (threads reading records, records buffered). Other arguments as in `pairs_dataset`.
    """
    source = data_dir if isinstance(data_dir, PairsSource) else PairsSource(data_dir, expect=expect)
    ds = pairs_dataset(source, global_batch_size=global_batch_size, seed=seed, shard_options=shard_options,
                       shuffle=shuffle, drop_remainder=drop_remainder, num_epochs=num_epochs, limit=limit)  # fmt: skip
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read))


def make_global_batch(local: Mapping[str, Any], mesh: Mesh, axis: str = "data") -> dict[str, Any]:
    """Host-local batch `{k: [b, ...]}` → global `jax.Array`s `[b × num_processes, ...]` sharded on `axis`.

    String leaves (`prompt`) stay host-local numpy arrays (they are only logged or re-encoded on the host).
    """
    sharding = NamedSharding(mesh, P(axis))
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = v if v.dtype.kind in "USO" else jax.make_array_from_process_local_data(sharding, v)
    return out
