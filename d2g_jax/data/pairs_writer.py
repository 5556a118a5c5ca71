"""Generates Diffusion2GAN's ODE pair dataset (paper §3.1 eq. 1, §4 "Training details", Table A1: 3M / 12M / 8M
pairs from 50 DDIM steps) and writes it as ArrayRecord shards; also owns the on-disk format the loader reads.

Pair `i` is fully determined by (teacher, CFG scale, steps, dtype, latent shape, seed, prompt list, i):
`noise_i = jax.random.normal(fold_in(PRNGKey(seed), i), (h, w, c), float32)`, `prompt_i = prompts[i % P]`,
`latent_i = ddim_sample(teacher, noise_i, prompt_i)` — so any pair can be regenerated on its own.

Layout of `out_dir`:
* `pairs-SSSSSSSSSS-EEEEEEEEEE.array_record`: the pairs with indices [S, E) in index order, one record each.
  Shard ranges are a fixed function of (num_pairs, shard_size), so names never collide across processes or
  reruns. A shard is written as `<name>.tmp` and renamed when closed: a file without `.tmp` is complete.
* `manifest.json` (written atomically: temp file + rename): format version, the `identity` (everything that
  determines the pairs: teacher fingerprint, CFG, steps, dtype, schedule, latent shape, seed, num_pairs,
  shard_size, prompts digest), `run_id` (hash of the identity), teacher path, record layout, the shard list and
  `complete` (true once every shard exists).

Record format (`encode_record`/`decode_record`): a msgpack map
`{"v": 1, "run": run_id, "index": int, "prompt": str, "noise": A, "latent": A, "crc": crc32}` with arrays
`A = {"dtype": numpy dtype string ("<f4"), "shape": [h, w, c], "data": raw C-order bytes}` (NHWC, float32) and
`crc` the zlib CRC-32 of prompt + noise + latent bytes. Plain msgpack: readable from any language.

Resuming: rerun the same call. Complete shards are verified (record count, run id) and kept, leftover `.tmp`
files of this process's shards are deleted and regenerated; the manifest's identity must equal the new call's
(else `PairsError`, nothing written). Multi-host: process p of P takes a contiguous block of the shard list
and runs its batches over its own local devices (batch on a `data` mesh axis), independently of the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from d2g_jax import files
from d2g_jax.sampling import Teacher, ddim_sample

FORMAT = "d2g_pairs"
FORMAT_VERSION = 1
RECORD_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PREFIX = "pairs-"
SHARD_SUFFIX = ".array_record"
TMP_SUFFIX = ".tmp"
# One record per chunk: O(1) random access for the globally shuffling loader; float noise does not compress.
WRITER_OPTIONS = "group_size:1,uncompressed"
RECORD_DOC = (
    "msgpack map {v, run, index, prompt, noise, latent, crc}; arrays as {dtype, shape, data} (NHWC float32, "
    "C order); crc = zlib.crc32(prompt utf-8 + noise bytes + latent bytes)"
)


class PairsError(ValueError):
    """A pair dataset is inconsistent: mismatched manifest, corrupt or foreign shard, bad arguments."""


# ----------------------------------------------------------------------------------------------------------
# Record and manifest format.


def _pack_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unpack_array(d: Any, where: str) -> np.ndarray:
    try:
        a = np.frombuffer(d["data"], dtype=np.dtype(d["dtype"]))
        return a.reshape(d["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise PairsError(f"{where}: malformed array ({e}).") from e


def _crc(prompt: str, noise: np.ndarray, latent: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(latent).tobytes(), zlib.crc32(noise.tobytes(), zlib.crc32(prompt.encode())))


def encode_record(index: int, prompt: str, noise: np.ndarray, latent: np.ndarray, run_id: str) -> bytes:
    """One pair → bytes (see the module docstring). noise, latent: [h, w, c] float32."""
    noise, latent = np.ascontiguousarray(noise), np.ascontiguousarray(latent)
    return msgpack.packb({
        "v": RECORD_VERSION, "run": run_id, "index": int(index), "prompt": prompt,
        "noise": _pack_array(noise), "latent": _pack_array(latent), "crc": _crc(prompt, noise, latent),
    })  # fmt: skip


def decode_record(data: bytes, where: str = "record") -> dict[str, Any]:
    """bytes → `{"index": int, "prompt": str, "noise": [h,w,c], "latent": [h,w,c], "run": str}`.

    Raises `PairsError` naming `where` when the bytes are not a valid record or fail the CRC.
    """
    try:
        r = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise PairsError(f"{where}: not a pair record ({type(e).__name__}: {e}).") from e
    if not isinstance(r, dict) or r.get("v") != RECORD_VERSION:
        raise PairsError(f"{where}: not a version-{RECORD_VERSION} pair record.")
    try:
        out = {"index": int(r["index"]), "prompt": str(r["prompt"]), "run": str(r["run"])}
    except (KeyError, TypeError, ValueError) as e:
        raise PairsError(f"{where}: malformed record ({e}).") from e
    out["noise"] = _unpack_array(r.get("noise"), f"{where} noise")
    out["latent"] = _unpack_array(r.get("latent"), f"{where} latent")
    if r.get("crc") != _crc(out["prompt"], out["noise"], out["latent"]):
        raise PairsError(f"{where}: CRC mismatch (corrupt record).")
    return out


def shard_name(start: int, end: int) -> str:
    """File name of the shard holding pair indices [start, end)."""
    return f"{SHARD_PREFIX}{start:010d}-{end:010d}{SHARD_SUFFIX}"


def plan_shards(num_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    """The fixed [start, end) ranges of all shards."""
    return [(s, min(s + shard_size, num_pairs)) for s in range(0, num_pairs, shard_size)]


def process_block(num_items: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous [lo, hi) block of `num_items` owned by one process (sizes differ by at most one)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    per, extra = divmod(num_items, process_count)
    lo = process_index * per + min(process_index, extra)
    return lo, lo + per + (process_index < extra)


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 over the prompts (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for p in prompts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    """The manifest of a pair directory, or None if it has none."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PairsError(f"{path}: invalid JSON ({e}).") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PairsError(f"{path}: not a {FORMAT} manifest.")
    if m.get("format_version") != FORMAT_VERSION:
        raise PairsError(f"{path}: format_version {m.get('format_version')}, this code reads {FORMAT_VERSION}.")
    return m


def _identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {_short(old.get(k))} → {_short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


def verify_shard(path: str, start: int, end: int, run_id: str, full: bool = False) -> None:
    """Checks a finished shard: record count = end − start, and the first and last records (`full`: every record,
    decoded with its checksum) belong to this run and range. A bad shard is named with the fix: delete it and
    rerun, which regenerates exactly that shard."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
        raise PairsError(f"{path}: cannot open as ArrayRecord ({e}).") from e
    try:
        n = reader.num_records()
        if n != end - start:
            raise PairsError(f"{path}: {n} records, expected {end - start} (pairs [{start}, {end})); the file is "
                             "corrupt or truncated: delete it and rerun generate_pairs to regenerate it.")  # fmt: skip
        for pos in range(n) if full else sorted({0, n - 1}):
            try:
                r = decode_record(reader.read([pos])[0], f"{path} record {pos}")
            except Exception as e:  # noqa: BLE001 - a bad checksum (PairsError) or an unreadable record (C++ errors)
                raise PairsError(f"{path}: record {pos} is damaged ({e}). Delete {path} and rerun "
                                 "--config.mode=pairs to regenerate that shard.") from None  # fmt: skip
            if r["run"] != run_id or r["index"] != start + pos:
                raise PairsError(f"{path}: record {pos} is pair {r['index']} of run {r['run']}, expected pair "
                                 f"{start + pos} of run {run_id} (a shard from another dataset?).")  # fmt: skip
    finally:
        with contextlib.suppress(Exception):  # closing a truncated file raises a bare RuntimeError
            reader.close()


# ----------------------------------------------------------------------------------------------------------
# Generation.


@functools.partial(jax.jit, static_argnames=("shape",))
def pair_noise(seed: int | jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[n, *shape] float32 noise of pairs `indices`: row k = normal(fold_in(PRNGKey(seed), indices[k]), shape)."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32))(indices)


class _Progress:
    """Logs pairs done, rate and ETA every `every_s` seconds (absl logging)."""

    def __init__(self, total: int, done: int, every_s: float):
        self.total, self.done, self.every_s = total, done, every_s
        self.t0 = self.last = time.monotonic()
        self.new = 0

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        self.new += n
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.new / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logging.info("pairs: %d/%d (%.1f%%) on this process, %.2f pairs/s, ETA %s", self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, _fmt_s(eta))  # fmt: skip


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


@dataclasses.dataclass
class _Job:
    teacher: Teacher
    prompts: Sequence[str]
    guidance_scale: float
    num_steps: int
    shape: tuple[int, int, int]
    seed: int
    batch_size: int
    run_id: str
    data_sharding: NamedSharding

    @functools.cached_property
    def params(self) -> Any:
        """The teacher's params replicated over the mesh (only once there is work to do)."""
        return jax.device_put(self.teacher.params, NamedSharding(self.data_sharding.mesh, P()))

    def dispatch(self, indices: np.ndarray) -> tuple[jax.Array, jax.Array, list[str]]:
        """Starts (asynchronously) the batch of pair `indices` (n = batch_size; the caller pads)."""
        noise = jax.device_put(pair_noise(self.seed, jnp.asarray(indices, jnp.uint32), self.shape), self.data_sharding)
        use_cfg = self.guidance_scale > 1.0
        prompts = [self.prompts[int(i) % len(self.prompts)] for i in indices]
        cond, uncond = self.teacher.conditioning(prompts, use_cfg)
        put = lambda c: None if c is None else {k: jax.device_put(v, self.data_sharding) for k, v in c.items()}
        latents = ddim_sample(self.teacher.unet_apply, self.params, noise, put(cond), put(uncond),
                              self.guidance_scale, self.teacher.schedule, self.num_steps,
                              vae_scale_factor=self.teacher.vae_scale_factor)  # fmt: skip
        return noise, latents, prompts

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(noise, latents, prompts) of pair `indices`: [n, h, w, c] twice, on the host."""
        noise, latents, prompts = self.dispatch(indices)
        return np.asarray(noise), np.asarray(latents), prompts


def _write_shard(job: _Job, out_dir: str, start: int, end: int, progress: _Progress) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    final = os.path.join(out_dir, shard_name(start, end))
    tmp = final + TMP_SUFFIX
    batches = []  # (first index, real pairs, padded indices)
    for b0 in range(start, end, job.batch_size):
        n = min(job.batch_size, end - b0)
        # Pad the last batch with copies of its last index: one compiled shape for the whole run.
        batches.append((b0, n, np.minimum(np.arange(b0, b0 + job.batch_size), b0 + n - 1)))
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
        running = job.dispatch(batches[0][2])
        for k, (b0, n, _) in enumerate(batches):
            # Queue the next batch before blocking on this one: tokenisation and record writing overlap the
            # accelerator's work instead of idling it.
            upcoming = job.dispatch(batches[k + 1][2]) if k + 1 < len(batches) else None
            noise, latents, prompts = np.asarray(running[0]), np.asarray(running[1]), running[2]
            for j in range(n):
                writer.write(encode_record(b0 + j, prompts[j], noise[j], latents[j], job.run_id))
            progress.update(n)
            running = upcoming
    finally:
        writer.close()  # an exception leaves the .tmp behind: never read, deleted by the next run
    os.replace(tmp, final)
    return final


def _make_job(teacher, prompts, guidance_scale, num_steps, shape, seed, batch_size, run_id, mesh) -> _Job:
    mesh = mesh or Mesh(np.asarray(jax.local_devices()), ("data",))
    if "data" not in mesh.axis_names:
        raise PairsError(f"the mesh needs a 'data' axis, has {mesh.axis_names}.")
    if batch_size % mesh.shape["data"]:
        raise PairsError(f"batch_size {batch_size} is not a multiple of the mesh's data axis "
                         f"({mesh.shape['data']} devices).")  # fmt: skip
    return _Job(
        teacher=teacher, prompts=prompts, guidance_scale=float(guidance_scale), num_steps=int(num_steps),
        shape=shape, seed=int(seed), batch_size=batch_size, run_id=run_id,
        data_sharding=NamedSharding(mesh, P("data")),
    )  # fmt: skip


def regenerate_pairs(
    teacher: Teacher,
    prompts: Sequence[str],
    indices: Sequence[int],
    *,
    guidance_scale: float,
    num_steps: int,
    latent_size: tuple[int, int],
    seed: int,
    num_pairs: int,
    shard_size: int,
    batch_size: int = 8,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Recomputes pairs `indices` exactly as `generate_pairs` did (same noise, prompt, sampler and batch).

    XLA may round a row differently depending on where it sits in a batch, so each index is recomputed inside
    the very batch that produced it: same shard plan (`num_pairs`, `shard_size`), same per-process `batch_size`
    (the writer's `batch_size`), same padding. With the writer's mesh the latents then equal the stored ones bit
    for bit on the same hardware/software.

    Returns `{"noise": [n, h, w, c], "latent": [n, h, w, c], "prompt": [n] list}` in the order of `indices`.
    """
    shape = (int(latent_size[0]), int(latent_size[1]), int(teacher.latent_channels))
    job = _make_job(teacher, prompts, guidance_scale, num_steps, shape, seed, batch_size, "", mesh)
    shards = plan_shards(num_pairs, shard_size)
    where: dict[int, tuple[int, np.ndarray]] = {}  # batch start → padded indices of the writer's batch
    rows = []
    for i in (int(i) for i in indices):
        if not 0 <= i < num_pairs:
            raise PairsError(f"pair index {i} is outside [0, {num_pairs}).")
        start, end = next((s, e) for s, e in shards if s <= i < e)
        b0 = start + (i - start) // batch_size * batch_size
        n = min(batch_size, end - b0)
        where.setdefault(b0, np.minimum(np.arange(b0, b0 + batch_size), b0 + n - 1))
        rows.append((b0, i - b0))
    done = {b0: job.batch(padded) for b0, padded in where.items()}
    return {
        "noise": np.stack([done[b0][0][r] for b0, r in rows]),
        "latent": np.stack([done[b0][1][r] for b0, r in rows]),
        "prompt": [done[b0][2][r] for b0, r in rows],
    }


def generate_pairs(
    out_dir: str,
    teacher: Teacher,
    prompts: Sequence[str],
    *,
    guidance_scale: float,
    num_steps: int,
    latent_size: tuple[int, int],
    seed: int,
    num_pairs: int | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    mesh: Mesh | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    on_shard_done: Callable[[str], None] | None = None,
    log_every_s: float = 60.0,
    verify: str = "ends",
) -> dict[str, Any]:
    """Simulates the teacher's DDIM ODE for pairs [0, num_pairs) and writes them under `out_dir` (resumable).

    Args:
      out_dir: output folder (created). Holding a manifest of another configuration → `PairsError`.
      teacher: the loaded teacher (`Teacher.from_pipeline`).
      prompts: the prompt list; pair i uses `prompts[i % len(prompts)]`.
      guidance_scale: CFG scale (paper: 3 or 8 for SD1.5, 7 for SDXL); ≤ 1 disables CFG.
      num_steps: DDIM steps (paper: 50).
      latent_size: (h, w) of the latents (64×64 for SD1.5 at 512 px, 128×128 for SDXL at 1024 px).
      seed: global noise seed. num_pairs: default `len(prompts)`.
      batch_size: pairs per sampler call on this process; a multiple of the mesh's `data` axis size.
      shard_size: pairs per ArrayRecord shard (part of the identity: resuming needs the same value).
      mesh: a mesh of this process's devices with a `data` axis (default: all local devices on `data`).
      process_index, process_count: this process's block of shards (default: jax.process_index/count).
      on_shard_done: called with the path of each finished shard (after its rename).
      log_every_s: progress log period (pairs done, pairs/s, ETA).
      verify: how finished shards found on disk are checked: "ends" (record count + first and last record) or
        "full" (every record decoded and checksummed; a damaged shard is named with the fix).

    Returns:
      The manifest dict (`complete` is true once every shard of every process exists).
    """
    num_pairs = len(prompts) if num_pairs is None else int(num_pairs)
    if not prompts:
        raise PairsError("no prompts given.")
    if verify not in ("ends", "full"):
        raise PairsError(f"verify={verify!r}: 'ends' or 'full'.")
    if num_pairs <= 0 or shard_size <= 0 or batch_size <= 0 or num_steps <= 0:
        raise PairsError(f"num_pairs ({num_pairs}), shard_size ({shard_size}), batch_size ({batch_size}) and "
                         f"num_steps ({num_steps}) must be positive.")  # fmt: skip
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    shape = (int(latent_size[0]), int(latent_size[1]), int(teacher.latent_channels))
    job = _make_job(teacher, prompts, guidance_scale, num_steps, shape, seed, batch_size, "", mesh)  # validates
    used = prompts if num_pairs > len(prompts) else prompts[:num_pairs]
    identity = {
        "teacher": teacher.fingerprint,
        "schedule": dataclasses.asdict(teacher.schedule),
        "guidance_scale": float(guidance_scale),
        "num_steps": int(num_steps),
        "dtype": teacher.dtype,
        "latent_shape": list(shape),
        "seed": int(seed),
        "num_pairs": num_pairs,
        "num_prompts": len(prompts),
        "shard_size": int(shard_size),
        "prompts_sha256": prompts_digest(used),
        "noise": "jax.random.normal(fold_in(PRNGKey(seed), i), latent_shape, float32); prompt = prompts[i % P]",
    }
    identity = json.loads(json.dumps(identity))  # canonical JSON types (tuples → lists) for comparisons
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    job = dataclasses.replace(job, run_id=run_id)
    shards = plan_shards(num_pairs, shard_size)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "identity": identity,
        "teacher_path": teacher.source,
        "record": RECORD_DOC,
        "num_pairs": num_pairs,
        "shards": [{"file": shard_name(s, e), "start": s, "end": e} for s, e in shards],
        "complete": False,
    }
    _claim_dir(out_dir, manifest)

    lo, hi = process_block(len(shards), pi, pc)
    mine = shards[lo:hi]
    pending = []
    for s, e in mine:
        path = os.path.join(out_dir, shard_name(s, e))
        if os.path.exists(path + TMP_SUFFIX):
            logging.info("%s: removing partial shard left by an interrupted run.", path + TMP_SUFFIX)
            os.remove(path + TMP_SUFFIX)
        if os.path.exists(path):
            verify_shard(path, s, e, run_id, full=verify == "full")
        else:
            pending.append((s, e))
    total = sum(e - s for s, e in mine)
    progress = _Progress(total, total - sum(e - s for s, e in pending), log_every_s)
    logging.info("process %d/%d: %d of its %d shards to generate (%d pairs) in %s.", pi, pc, len(pending),
                 len(mine), total - progress.done, out_dir)  # fmt: skip

    if pending:
        for s, e in pending:
            path = _write_shard(job, out_dir, s, e, progress)
            if on_shard_done is not None:
                on_shard_done(path)
        progress.update(0, force=True)

    if pc > 1 and pc == jax.process_count():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"d2g_pairs_done_{run_id}")
    if all(os.path.exists(os.path.join(out_dir, shard_name(s, e))) for s, e in shards):
        manifest["complete"] = True
        files.atomic_write_json(os.path.join(out_dir, MANIFEST), manifest, sort_keys=True)
        logging.info("%s: all %d shards (%d pairs) complete.", out_dir, len(shards), num_pairs)
    return manifest


def _claim_dir(out_dir: str, manifest: dict[str, Any]) -> None:
    """Creates `out_dir` with the manifest, or checks that its existing manifest has the same identity."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    old = read_manifest(out_dir)
    if old is None:
        strays = sorted(f for f in os.listdir(out_dir) if f.startswith(SHARD_PREFIX))
        if strays:
            raise PairsError(f"{out_dir}: holds shard files ({strays[0]}, ...) but no {MANIFEST}; refusing to mix "
                             "datasets. Use an empty folder.")  # fmt: skip
        files.atomic_write_json(path, manifest, sort_keys=True)
        return
    diff = _identity_diff(old.get("identity", {}), manifest["identity"])
    if diff:
        raise PairsError(f"{path}: this folder holds pairs of a different configuration; nothing was written. "
                         "Use another out_dir, or the original settings. Differences (old → new): "
                         + "; ".join(diff))  # fmt: skip
