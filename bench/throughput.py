"""The MNIST world's throughput on this CPU: pair generation, stage-1 and stage-2 steps of configs/mnist.py under
several host-device / XLA thread settings, interleaved in one run so their ratios hold on a noisy machine.

    python bench/throughput.py [--parts pairs,stage1,stage2] [--variants 1dev,2dev,...] [--repeats 2]
                               [--root /tmp/d2g_throughput]

Each cell is a real `python -m d2g_jax.main --config=configs/mnist.py` subprocess (the job a user runs) with the
variant's environment / config fields:

* pairs:  `--config.mode=pairs`, `--pairs` pairs (default 1,024) in 4 batches of configs/mnist.py's 256;
* stage1: `--config.mode=train`, `--steps` stage-1 steps (default 120) at batch 64 on a shared pair set;
* stage2: `--config.mode=train` from the first stage-1 cell's generator (`stage2.init_from`), `--steps2` steps
  (default 60) of the full stage 2 (D, lazy R1 every 16 steps, mix-and-match).

The rate is the steady state: the work done between the first and the last progress line of the stage divided by
the time between them (the compile and the first batch/step are outside it; `--config.log_every_s=3`). Variants are
interleaved (repeat 1: every variant, then repeat 2, …) and each cell's median over repeats is shown, with the
ratio to the first variant (today's configs/mnist.py default before this bench: one host device).

Variants (see `VARIANTS`): the host CPU as 1 or 2 JAX devices (`config.cpu.host_devices`, i.e. XLA's
`--xla_force_host_platform_device_count`), Eigen's intra-op threads off (`--xla_cpu_multi_thread_eigen=false`),
oneDNN / XNNPACK for XLA:CPU's convolutions and dots, and the pair batch at 512.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# name → (XLA_FLAGS additions, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "1dev": ("", {"cpu.host_devices": "1"}),
    "2dev": ("", {"cpu.host_devices": "2"}),
    "1dev_noeigen": ("--xla_cpu_multi_thread_eigen=false", {"cpu.host_devices": "1"}),
    "2dev_noeigen": ("--xla_cpu_multi_thread_eigen=false", {"cpu.host_devices": "2"}),
    "2dev_onednn": ("--xla_cpu_use_onednn=true", {"cpu.host_devices": "2"}),
    "2dev_xnnpack": ("--xla_cpu_use_xnnpack=true", {"cpu.host_devices": "2"}),
    "2dev_pairs512": ("", {"cpu.host_devices": "2", "pairs.batch_size": "512"}),
    "4dev": ("", {"cpu.host_devices": "4"}),
}
DEFAULT_VARIANTS = "1dev,2dev,2dev_noeigen,2dev_onednn,2dev_xnnpack"
PROGRESS = {
    "pairs": re.compile(r"^(\d\d):(\d\d):(\d\d) pairs: (\d+)/\d+ "),
    "stage1": re.compile(r"^(\d\d):(\d\d):(\d\d) stage1 (\d+)/\d+ "),
    "stage2": re.compile(r"^(\d\d):(\d\d):(\d\d) stage2 (\d+)/\d+ "),
}


def steady_rate(log: str, part: str) -> float | None:
    """Units (pairs or steps) per second between the first and the last progress line of `part`."""
    pts = []
    for line in log.splitlines():
        m = PROGRESS[part].match(line)
        if m:
            h, mi, s, n = (int(g) for g in m.groups())
            pts.append((h * 3600 + mi * 60 + s, n))
    if len(pts) < 2:
        return None
    (t0, n0), (t1, n1) = pts[0], pts[-1]
    if t1 < t0:  # past midnight
        t1 += 86400
    return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None


def command(part: str, variant: str, wd: str, args, pairs_dir: str, init_from: str) -> tuple[list[str], dict]:
    flags, over = VARIANTS[variant]
    cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", f"--workdir={wd}",
           "--config.log_every_s=3", "--config.pairs.seed=0"]  # fmt: skip
    if part == "pairs":
        cmd += ["--config.mode=pairs", f"--config.pairs.num_pairs={args.pairs}",
                f"--config.pairs.dir={os.path.join(wd, 'pairs')}"]  # fmt: skip
    else:
        cmd += ["--config.mode=train", f"--config.pairs.dir={pairs_dir}", "--config.train.eval_every=0",
                "--config.train.sample_every=0", "--config.stage2.eval_every=0", "--config.stage2.sample_every=0",
                "--config.train.log_every=10", "--config.stage2.log_every=10"]  # fmt: skip
        if part == "stage1":
            cmd += [f"--config.train.num_steps={args.steps}", f"--config.train.ckpt_every={args.steps}",
                    "--config.stage2.num_steps=0"]  # fmt: skip
        else:
            n2 = args.steps2
            cmd += [f"--config.stage2.init_from={init_from}", f"--config.train.num_steps={args.steps}",
                    f"--config.stage2.num_steps={n2}", f"--config.stage2.ckpt_every={n2}"]  # fmt: skip
    cmd += [f"--config.{k}={v}" for k, v in over.items()]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the variant decides the device count
    if flags:
        env["XLA_FLAGS"] = flags
    return cmd, env


def run_cell(part: str, variant: str, rep: int, args, pairs_dir: str, init_from: str) -> float | None:
    wd = os.path.join(args.root, f"{part}_{variant}_r{rep}")
    shutil.rmtree(wd, ignore_errors=True)
    cmd, env = command(part, variant, wd, args, pairs_dir, init_from)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = p.stdout + p.stderr
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "bench.log"), "w") as f:
        f.write(log)
    if p.returncode:
        print(f"  {part}/{variant}/r{rep}: FAILED (rc {p.returncode}); {wd}/bench.log:\n" +
              "\n".join(log.splitlines()[-5:]), flush=True)  # fmt: skip
        return None
    rate = steady_rate(log, part)
    print(f"  {part:6s} {variant:14s} r{rep}: {rate if rate is None else round(rate, 3)} "
          f"{'pairs' if part == 'pairs' else 'steps'}/s (wall {time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    return rate


def ensure_pairs(args) -> str:
    """The pair set the training cells read (made once, 1,024 pairs, with 2 host devices)."""
    d = os.path.join(args.root, "train_pairs")
    if not os.path.isfile(os.path.join(d, "manifest.json")):
        cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", "--config.mode=pairs",
               f"--workdir={os.path.join(args.root, 'train_pairs_run')}", f"--config.pairs.dir={d}",
               "--config.pairs.num_pairs=1024", "--config.pairs.seed=0", "--config.cpu.host_devices=2"]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return d


def ensure_init(args, pairs_dir: str) -> str:
    """A finished stage-1 workdir for the stage-2 cells (a short stage 1; stage 2's speed does not depend on it)."""
    wd = os.path.join(args.root, "stage2_init")
    if not os.path.isfile(os.path.join(wd, "stage1", "done")):
        cmd, env = command("stage1", "2dev", wd, args, pairs_dir, "")
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        open(os.path.join(wd, "stage1", "done"), "w").close()
    return wd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/d2g_throughput")
    ap.add_argument("--parts", default="pairs,stage1,stage2")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--steps2", type=int, default=60)
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
    for p in parts:
        if p not in PROGRESS:
            raise SystemExit(f"--parts: unknown {p!r}; known: {', '.join(PROGRESS)}")
    os.makedirs(args.root, exist_ok=True)
    pairs_dir = ensure_pairs(args) if set(parts) - {"pairs"} else ""
    init_from = ensure_init(args, pairs_dir) if "stage2" in parts else ""
    rates: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        for part in parts:
            for v in variants:
                r = run_cell(part, v, rep, args, pairs_dir, init_from)
                if r is not None:
                    rates.setdefault((part, v), []).append(r)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.repeats} interleaved repeats (median; "
          "ratio to the first variant)\n")  # fmt: skip
    print("| variant | " + " | ".join(f"{p} ({'pairs' if p == 'pairs' else 'steps'}/s) | ×" for p in parts) + " |")
    print("|---|" + "---|---|" * len(parts))
    for v in variants:
        cells = []
        for p in parts:
            r = rates.get((p, v))
            b = rates.get((p, variants[0]))
            m = statistics.median(r) if r else None
            mb = statistics.median(b) if b else None
            cells += [f"{m:.3f}" if m else "—", f"{m / mb:.2f}" if m and mb else "—"]
        flags, over = VARIANTS[v]
        what = " ".join([f"{k}={x}" for k, x in over.items()] + ([f"XLA_FLAGS={flags}"] if flags else []))
        print(f"| {v} (`{what}`) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
