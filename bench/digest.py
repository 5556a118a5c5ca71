"""The cost of a checkpoint's digest record (issue 24): GB/s of sha256 / blake2b / (xxhash, blake3 if installed)
on this machine, the record of a real checkpoint folder, and the SD1.5-scale estimate.

    python bench/digest.py [--mb 512] [--threads 1,2] [--checkpoint /path/to/checkpoints/<step>] [--tiny_steps 40]

Hashes a file of random bytes (in the page cache after the first pass: the rate of the hash, not of the disk),
then, with --checkpoint, `integrity.write_record` on a copy of a real step folder (what a save pays, in the
background). Prints rates and the estimated time for a 14 GB SD1.5 stage-2 state. --tiny_steps N: a tiny-config
stage-1 run of N steps checkpointing every 2 steps (asynchronously), with and without the records (alternating,
twice each), and the median step time of each (metrics.jsonl, step 1 = compile excluded).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2g_jax.train import integrity  # noqa: E402

EVERY = 5  # tiny run: checkpoint every EVERY steps
SD15_STATE_GB = 14.0  # G + EMA + Adam (fp32) of the 860M U-Net ≈ 13.8 GB; stage 2 adds D


def _hashers():
    out = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b, "sha1": hashlib.sha1, "md5": hashlib.md5}
    try:
        import xxhash

        out["xxh3_128"] = xxhash.xxh3_128
    except ImportError:
        pass
    try:
        import blake3

        out["blake3"] = blake3.blake3
    except ImportError:
        pass
    return out


def _rate(path: str, make, threads: int, repeats: int) -> float:
    """GB/s of hashing `path` `threads` times concurrently (each thread the whole file)."""
    import concurrent.futures

    size = os.path.getsize(path)

    def one(_):
        h = make()
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(integrity.CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
        return h.hexdigest()

    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(threads)))
        best = max(best, size * threads / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", default="", help="a checkpoint step folder to time write_record/check_folder on")
    p.add_argument("--tiny_steps", type=int, default=0, help="also time tiny stage-1 steps with/without records")
    a = p.parse_args()
    if a.tiny_steps:
        _tiny_step_times(a.tiny_steps)
    print(f"cpus: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        with open(path, "wb") as f:
            for _ in range(a.mb):
                f.write(os.urandom(1 << 20))
        rates = {}
        for name, make in _hashers().items():
            for t in (int(x) for x in a.threads.split(",")):
                r = _rate(path, make, t, a.repeats)
                rates[(name, t)] = r
                print(f"{name:9s} threads={t}: {r:.2f} GB/s ({a.mb} MB from the page cache, best of {a.repeats})")
        r1 = rates[("sha256", 1)]
        print(f"SD1.5 estimate ({SD15_STATE_GB:g} GB state), sha256: {SD15_STATE_GB / r1:.1f} s on one core; "
              f"{SD15_STATE_GB / (r1 * 8):.1f} s with 8 hashing threads on ≥ 8 free cores (if the disk keeps up)")
        if a.checkpoint:
            work = os.path.join(tmp, "step")
            shutil.copytree(a.checkpoint, work, ignore=shutil.ignore_patterns(integrity.RECORD))
            n = len(integrity.tree_files(work))
            size = sum(os.path.getsize(os.path.join(work, f)) for f in integrity.tree_files(work))
            for label, fn in (("write_record", lambda: integrity.write_record(work)),
                              ("check_folder", lambda: integrity.check_folder(work))):  # fmt: skip
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                best = min(times)
                print(f"{label}: {a.checkpoint} ({n} files, {size / 1e6:.1f} MB): {best * 1e3:.1f} ms "
                      f"({size / best / 1e9:.2f} GB/s, best of {a.repeats})")


def _tiny_step_times(steps: int) -> None:
    import json
    import statistics

    from clu import metric_writers

    from configs import tiny
    from d2g_jax import pipeline

    class Collect(metric_writers.LoggingWriter):  # the trainer's scalars (step_time_s is not in metrics.jsonl)
        def write_scalars(self, step, scalars):
            if "train/step_time_s" in scalars:
                times.append(float(scalars["train/step_time_s"]))

    metric_writers.create_default_writer = lambda *a, **k: Collect()
    real = integrity.write_record
    with tempfile.TemporaryDirectory() as tmp:
        for i, records in enumerate((False, True, False, True)):
            c = tiny.get_config()
            c.pairs.num_pairs, c.pairs.num_steps, c.pairs.shard_size = 16, 2, 8
            c.train.num_steps, c.train.ckpt_every, c.train.log_every, c.train.keep = steps, EVERY, 1, 3
            c.train.eval_every = c.train.sample_every = 0
            c.train.holdout, c.train.async_ckpt = 4, True
            c.stage2.num_steps, c.loss.kind, c.mode = 0, "mse", "train"
            wd = os.path.join(tmp, f"run{i}")
            if i == 0:
                pipeline.run_pairs(c, os.path.join(tmp, "shared"))
            c.pairs.dir = os.path.join(tmp, "shared", "pairs")
            os.makedirs(wd)
            shutil.copytree(os.path.join(tmp, "shared", "tiny_teacher"), os.path.join(wd, "tiny_teacher"))
            integrity.write_record = real if records else (lambda folder, **kw: None)
            times: list[float] = []
            t0 = time.perf_counter()
            pipeline.run(c, wd)
            total = time.perf_counter() - t0
            integrity.write_record = real
            st = times
            ck = os.path.join(wd, "stage1", "checkpoints")
            recs = [json.load(open(os.path.join(ck, d, integrity.RECORD))) for d in os.listdir(ck)
                    if os.path.isfile(os.path.join(ck, d, integrity.RECORD))]  # fmt: skip
            rec = (f"records: {len(recs)} kept, {statistics.median(r['seconds'] for r in recs) * 1e3:.1f} ms each "
                   f"for {recs[0]['bytes'] / 1e6:.1f} MB") if recs else "records: off"  # fmt: skip
            # times[k] is step k+1; a save runs after step s's log line, so it falls in step s+1's interval.
            after_save = [t for k, t in enumerate(st[1:], start=2) if (k - 1) % EVERY == 0]
            other = [t for k, t in enumerate(st[1:], start=2) if (k - 1) % EVERY != 0]
            ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
            print(f"tiny stage 1, {steps} steps, ckpt every {EVERY} (async), {rec}: run {total:.1f} s; median step "
                  f"{ms(statistics.median(other))}, steps holding a save {ms(statistics.median(after_save))}, mean of "
                  f"all but the first {ms(statistics.mean(st[1:]))}", flush=True)


if __name__ == "__main__":
    main()
