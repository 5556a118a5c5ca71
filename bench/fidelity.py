"""The fidelity study on the MNIST world (FIDELITY.md): the paper's Table 1 and Table 2 at small scale, its Fig. 5,
and the choices the paper leaves open — each row a real `d2g_jax.main` run on one shared pair set.

    python bench/fidelity.py --root /tmp/d2g_fidelity                 # every row not yet done, then the tables
    python bench/fidelity.py --root /tmp/d2g_fidelity --only t1       # a part (t1, t2, open, fig5), e.g. per session
    python bench/fidelity.py --root /tmp/d2g_fidelity --tables        # only print/write the tables of finished rows
    python bench/fidelity.py --list                                   # the rows and their exact commands

Resumable: a row is done when `<root>/rows/<row>/row.json` exists; an interrupted row resumes from its checkpoints
(a rerun of the same `main` command). Rows run in priority order (the rows a conclusion rests on first), so a
partial study still has every table's key rows.

Shared by every row: the pairs (`<root>/pairs`: 3,072 teacher ODE pairs of configs/mnist.py's teacher, pairs.seed
0; `STUDY_PAIRS`), the reference statistics and the teacher's images for teacher_dist (`<root>/cache`). A row's
seed (`config.seed`) changes the training noise (data order, augmentations, mix-and-match, D's z-conv init) — not
the pairs.

* Table 1 (stage 1, equal steps and batch): loss.kind ∈ mse, pseudo_huber, latent_lpips, e_latent_lpips,
  e_latent_lpips_star; seeds 0-2.
* Table 2 (stage 2 from one stage-1 generator, `--base`): a control that continues stage 1 alone for the same
  steps (λ_GAN = 0: the same fresh optimiser, schedule, data and EMA; G never sees D), plain diffusion D, + z, + R1,
  + multi-scale, + mix-and-match (= the default); control and full on seeds 0-2.
* Open choices (stage 2 from the same base, vs the full row): stage2.ema_restart, train.lr_reading=stage_switch,
  disc.r1_scope=device (16 slices: one sample per "GPU"), stage2.update_order=alternating, loss.star_reduce=sum.
* Fig. 5: one random latent optimised toward a held-out digit's latent under MSE, LatentLPIPS and E-LatentLPIPS
  (in-process; a PNG of the decoded trajectory and the final distances).
* Table 6 analogue (`--only t6`): configs/mnist.py's stage 1 at 3k, 12k and 48k training pairs (prefixes of one
  49,152-pair set, `<root>/pairs48k` or `--big_pairs`, via train.max_pairs; its last 64 pairs are every row's
  held-out pairs) at 1k steps, and at 1k / 3k / 10k steps on all 48k. The 10k-step point is configs/mnist_long.py's
  stage 1 (the same stage 1 with 10,000 steps): `--long <its workdir>` reads its step-10,000 evaluation instead of
  running the row again. Plot: `<root>/table6.png` (FD and prompt accuracy vs pairs and vs steps, log axes).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python bench/fidelity.py` from anywhere
    sys.path.insert(0, REPO)
STUDENT = "student, 1 step (export)"
METRICS = (("fd", "FD ↓", "{:.2f}"), ("prompt_acc", "prompt acc ↑", "{:.3f}"),
           ("fd_precision", "precision", "{:.3f}"), ("fd_recall", "recall", "{:.3f}"),
           ("teacher_dist", "dist. to teacher ↓", "{:.4f}"), ("train_img_per_s", "train img/s", "{:.0f}"),
           ("d_acc", "D held-out acc", "{:.3f}"), ("gan_grad_ratio", "‖∇G GAN‖/‖∇G distil‖", "{:.3f}"))  # fmt: skip

# Sizes (2 CPU cores; BENCHMARKS.md): stage-1 rows S1 steps, stage-2 rows S2 steps, both at configs/mnist.py's batch 64.
S1, S2 = 300, 100
# Table 2 at the budget where stage 2 acts (issue 20, FIDELITY.md "Stage 2 that acts"): S2B stage-2 steps, D as
# configs/mnist.py sets it now; D's held-out accuracy read every S2B // 5 steps (the row's last value is shown).
S2B = 500
# The full row with D unclipped (configs/mnist.py's disc.grad_clip=10 off): what the R1 mean score and t = 500 alone do.
T2B_NOCLIP = ("full_noclip", "full, D unclipped (disc.grad_clip=0)", {"disc.grad_clip": 0.0})
BASE_STEPS = 1000  # the Table-2 generator: configs/mnist.py's stage 1 until 2026-12-06 (1,000 steps of E-LatentLPIPS*)
STUDY_PAIRS = 3072  # the study's pair set: configs/mnist.py's until 2026-12-06 (4,096 since), kept for its rows

PLAIN_D = {"disc.z_cond": False, "disc.r1_gamma": 0.0, "disc.multiscale_in": False, "disc.multiscale_out": False,
           "disc.mix_match_fraction": 0.0}  # fmt: skip
T1 = [("mse", "MSE"), ("pseudo_huber", "Pseudo-Huber"), ("latent_lpips", "LatentLPIPS"),
      ("e_latent_lpips", "E-LatentLPIPS"), ("e_latent_lpips_star", "E-LatentLPIPS*")]  # fmt: skip
T2 = [("control", "stage 1 continued (λ_GAN = 0), control", {"stage2.gan_weight": 0.0}),
      ("plain", "+ diffusion D (plain)", dict(PLAIN_D)),
      ("z", "+ z-conditional D", {**PLAIN_D, "disc.z_cond": True}),
      ("r1", "+ single-sample R1", {**PLAIN_D, "disc.z_cond": True, "disc.r1_gamma": 0.01}),
      ("ms", "+ multi-scale in/out", {**PLAIN_D, "disc.z_cond": True, "disc.r1_gamma": 0.01,
                                      "disc.multiscale_in": True, "disc.multiscale_out": True}),
      ("full", "+ mix-and-match (full = default)", {})]  # fmt: skip
# Table 1's latent rows carry the official L1 term (loss.l1); without it, does LatentLPIPS fail as in Fig. 5?
T1X = [("latent_lpips_nol1", "LatentLPIPS, no L1 term", {"loss.kind": "latent_lpips", "loss.l1": False}),
       ("e_latent_lpips_nol1", "E-LatentLPIPS, no L1 term",
        {"loss.kind": "e_latent_lpips", "loss.l1": False})]  # fmt: skip
OPEN = [("ema_restart", "stage2.ema_restart=True (EMA restarts at stage 2)", {"stage2.ema_restart": True}),
        ("lr_switch", "train.lr_reading=stage_switch (stage 2 constant 5e-5)",
         {"train.lr_reading": "stage_switch", "stage2.lr_end": 5e-5}),
        ("r1_device", "disc.r1_scope=device, 16 slices (16 R1 samples)",
         {"disc.r1_scope": "device", "disc.r1_groups": 16}),
        ("alternating", "stage2.update_order=alternating", {"stage2.update_order": "alternating"}),
        ("star_sum", "loss.star_reduce=sum", {"loss.star_reduce": "sum"})]  # fmt: skip


def fmt_value(v) -> str:
    return str(v)


# Table 6 analogue (issue 21): (name, label, training pairs (train.max_pairs; 0 = all 49,088), stage-1 steps).
T6_SET = 49_152  # pairs in the set (48 shards of 1,024); the last 64 are held out (configs/mnist.py train.holdout)
T6 = [("p3k_s1k", "3,008 pairs, 1k steps", 3_008, 1_000), ("p12k_s1k", "12,032 pairs, 1k steps", 12_032, 1_000),
      ("p48k_s1k", "49,088 pairs, 1k steps", 0, 1_000), ("p48k_s3k", "49,088 pairs, 3k steps", 0, 3_000),
      ("p48k_s10k", "49,088 pairs, 10k steps (configs/mnist_long.py stage 1)", 0, 10_000)]  # fmt: skip
T6_LONG = "p48k_s10k"


def rows(root: str, base: str, seeds=(0, 1, 2)) -> list[dict]:
    """Every row, in run order: Table 1 and Table 2 on the first seed, the key rows (Table 1, Table 2's control and
    full: the conclusions rest on them) on the other seeds, then the open choices seed by seed."""
    out: list[dict] = []

    def add(table, name, label, seed, over, kind):
        out.append({"table": table, "name": name, "label": label, "seed": seed, "over": over, "kind": kind,
                    "id": f"{table}_{name}_s{seed}"})  # fmt: skip

    base_row = not base
    for i, s in enumerate(seeds):
        for k, label in T1:
            add("t1", k, label, s, {"loss.kind": k}, "stage1")
        if i == 0 and base_row:
            add("t2", "base", f"stage-1 base ({BASE_STEPS} steps, E-LatentLPIPS*)", 0, {}, "base")
        for name, label, over in T2:
            if name in ("control", "full"):
                add("t2", name, label, s, over, "stage2")
        if i == 0:
            for name, label, over in T2:
                if name not in ("control", "full"):
                    add("t2", name, label, s, over, "stage2")
    for name, label, over in T1X:
        add("t1x", name, label, seeds[0], over, "stage1")
    # Table 2 at S2B steps: control and full on every seed first, then the ablation rows on the first two seeds.
    for s in seeds:
        for name, label, over in T2:
            if name in ("control", "full"):
                add("t2b", name, label, s, over, "stage2b")
    add("t2b", *T2B_NOCLIP[:2], seeds[0], T2B_NOCLIP[2], "stage2b")
    for s in seeds[:2]:
        for name, label, over in T2:
            if name not in ("control", "full"):
                add("t2b", name, label, s, over, "stage2b")
    for s in seeds:
        for name, label, over in OPEN:
            add("open", name, label, s, over, "stage2")
    for name, label, n, steps in T6:
        add("t6", name, label, seeds[0], {"train.max_pairs": n, "train.num_steps": steps}, "scale")
    return out


def command(row: dict, root: str, base: str) -> list[str]:
    wd = os.path.join(root, "rows", row["id"])
    args = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", f"--workdir={wd}",
            "--config.mode=all", f"--config.seed={row['seed']}", "--config.pairs.seed=0",
            f"--config.pairs.dir={os.path.join(root, 'pairs')}", "--config.report.rows=student",
            "--config.report.grid_images=0", f"--config.eval.stats_dir={os.path.join(root, 'cache')}",
            "--config.train.eval_every=0", "--config.train.sample_every=0", "--config.train.keep=1",
            "--config.stage2.eval_every=0", "--config.stage2.sample_every=0", "--config.log_every_s=60"]  # fmt: skip
    if row["kind"] == "scale":  # configs/mnist.py's stage 1 on the big set; held-out distill loss at the last step
        n = row["over"]["train.num_steps"]
        args[args.index(f"--config.pairs.dir={os.path.join(root, 'pairs')}")] = f"--config.pairs.dir={big_pairs(root)}"
        args.remove("--config.train.eval_every=0")
        over = {"pairs.num_pairs": T6_SET, "train.ckpt_every": min(n, 1000), "train.eval_every": n,
                "stage2.num_steps": 0}  # fmt: skip
    elif row["kind"] == "stage1":
        over = {"pairs.num_pairs": STUDY_PAIRS, "train.num_steps": S1, "train.ckpt_every": S1,
                "train.ema_start": S1 // 3, "stage2.num_steps": 0}  # fmt: skip
    elif row["kind"] == "base":
        over = {"pairs.num_pairs": STUDY_PAIRS, "train.num_steps": BASE_STEPS, "train.ckpt_every": BASE_STEPS,
                "stage2.num_steps": 0}  # fmt: skip
    else:
        n2 = S2B if row["kind"] == "stage2b" else S2
        # stage2.log_grad_parts: the ‖∇G GAN‖/‖∇G distil‖ column (configs/mnist.py turns it off)
        over = {"pairs.num_pairs": STUDY_PAIRS, "stage2.init_from": base or os.path.join(root, "rows", "t2_base_s0"),
                "train.num_steps": BASE_STEPS, "stage2.num_steps": n2, "stage2.ckpt_every": n2,
                "stage2.log_grad_parts": True}  # fmt: skip
        if row["kind"] == "stage2b":  # D's held-out accuracy in stage2/metrics.jsonl
            over["stage2.eval_every"] = S2B // 5
    over.update(row["over"])
    if HOST_DEVICES[0]:
        over["cpu.host_devices"] = HOST_DEVICES[0]
    return args + [f"--config.{k}={fmt_value(v)}" for k, v in over.items()]


HOST_DEVICES = [0]  # --host_devices: 0 = the config's (a runner beside another job can take 1)
BIG_PAIRS = [""]  # --big_pairs


def big_pairs(root: str) -> str:
    return BIG_PAIRS[0] or os.path.join(root, "pairs48k")


def git_version() -> str:
    """The commit of the code a row ran (+dirty when d2g_jax/ or configs/ differ from it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "d2g_jax", "configs"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_rate(log: str, stage: str) -> float | None:
    """Steps/s of the stage's last progress line (measured after the first, compiling step)."""
    rate = None
    for line in log.splitlines():
        m = re.search(rf"\b{stage} \d+/\d+ .*?([\d.]+) (steps|it)/s", line)
        if m:
            rate = float(m.group(1))
    return rate


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _lock(wd: str) -> bool:
    """Takes `<wd>/lock` (this process's pid) unless a live process holds it: several runners may share a root
    (`python bench/fidelity.py --root R` twice on a machine with cores to spare) and never run one row twice."""
    path = os.path.join(wd, "lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            os.remove(path)  # a stale lock of a runner that died
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def row_env(root: str) -> dict:
    """The rows' environment: JAX's persistent compilation cache in `<root>/jax_cache`, so rows that differ only in
    their seed (or in anything outside the jitted step) compile once (minutes per stage-2 row on 2 cores)."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def run_row(row: dict, root: str, base: str) -> dict:
    wd = os.path.join(root, "rows", row["id"])
    done = os.path.join(wd, "row.json")
    if os.path.isfile(done):
        return json.load(open(done))
    os.makedirs(wd, exist_ok=True)
    if not _lock(wd):
        print(f"[{time.strftime('%H:%M:%S')}] {row['id']}: another runner has it", flush=True)
        return {}
    try:
        return _run_locked(row, root, base, wd, done)
    finally:
        os.remove(os.path.join(wd, "lock"))


def _run_locked(row: dict, root: str, base: str, wd: str, done: str) -> dict:
    if os.path.isfile(done):
        return json.load(open(done))
    cmd = command(row, root, base)
    print(f"[{time.strftime('%H:%M:%S')}] {row['id']}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(wd, "row.log"), "a") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=row_env(root)).returncode
    wall = time.time() - t0
    log = open(os.path.join(wd, "row.log")).read()
    if rc != 0:
        tail = "\n".join(log.splitlines()[-8:])
        print(f"  FAILED (rc {rc}) after {wall:.0f} s; last lines of {wd}/row.log:\n{tail}")
        return {}
    report = json.load(open(os.path.join(wd, "report", "report.json")))[STUDENT]
    stage = "stage1" if row["kind"] in ("stage1", "base", "scale") else "stage2"
    batch = 64
    rate = train_rate(log, stage)
    metrics = {**report, "train_img_per_s": rate * batch if rate else None, **stage2_log(wd), **stage1_log(wd)}
    result = {**row, "cmd": " ".join(["python"] + cmd[1:]).replace(root, "$ROOT"), "wall_s": wall,
              "version": git_version(), "metrics": metrics}  # fmt: skip
    with open(done + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(done + ".tmp", done)
    print(f"  done in {wall:.0f} s: FD {report['fd']:.2f}, prompt acc {report['prompt_acc']:.3f}", flush=True)
    return result


def stage2_log(wd: str) -> dict:
    """From `<wd>/stage2/metrics.jsonl`: D's last held-out accuracy (`d_acc`, with its history `d_acc_steps`) and
    the mean ratio of G's GAN-gradient norm to its distillation-gradient norm over the logged steps."""
    path = os.path.join(wd, "stage2", "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    recs = [json.loads(ln) for ln in open(path) if ln.strip()]
    acc = [(r["step"], r["eval/d_acc"]) for r in recs if "eval/d_acc" in r]
    ratio = [r["gan_grad_ratio"] for r in recs if "gan_grad_ratio" in r]
    out = {}
    if acc:
        out.update(d_acc=acc[-1][1], d_acc_steps=acc)
    if ratio:
        out["gan_grad_ratio"] = sum(ratio) / len(ratio)
    return out


def stage1_log(wd: str) -> dict:
    """From `<wd>/stage1/metrics.jsonl`: the EMA's held-out distillation loss at the last evaluation."""
    path = os.path.join(wd, "stage1", "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    recs = [json.loads(ln) for ln in open(path) if ln.strip()]
    ev = [r for r in recs if "eval/ema_distill" in r]
    return {"ema_distill": ev[-1]["eval/ema_distill"], "ema_distill_step": ev[-1]["step"]} if ev else {}


def long_row(long_wd: str) -> dict:
    """The Table 6 analogue's 10k-step row from a configs/mnist_long.py workdir: its stage-1 evaluation at step
    10,000 (`eval.every` on all 500 held-out captions: the metrics of the report's student row, for the stage-1 EMA)
    and the EMA's held-out distillation loss there."""
    name, label, _, steps = next(t for t in T6 if t[0] == T6_LONG)
    path = os.path.join(long_wd, "eval", f"stage1_step_{steps:08d}_subset500.json")
    if not os.path.isfile(path):
        return {}
    ev = json.load(open(path))
    s1 = stage1_log(long_wd)
    recs = [json.loads(ln) for ln in open(os.path.join(long_wd, "stage1", "metrics.jsonl")) if ln.strip()]
    rates = sorted(r["img_per_s"] for r in recs if "img_per_s" in r)
    return {"table": "t6", "name": name, "label": label, "seed": 0, "kind": "long", "id": f"t6_{name}_s0",
            "cmd": f"python -m d2g_jax.main --config=configs/mnist_long.py --workdir={long_wd}",
            "version": git_version(),
            "metrics": {**ev["metrics"], **s1, "train_img_per_s": rates[len(rates) // 2] if rates else None}}


def ensure_big_pairs(root: str) -> None:
    """The Table 6 analogue's 49,152-pair set (configs/mnist_long.py's pairs; the first 3,072 are `<root>/pairs`)."""
    d = big_pairs(root)
    m = os.path.join(d, "manifest.json")
    if os.path.isfile(m) and json.load(open(m)).get("complete"):
        return
    cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", f"--workdir={d}_run",
           "--config.mode=pairs", "--config.pairs.seed=0", f"--config.pairs.num_pairs={T6_SET}",
           f"--config.pairs.dir={d}"]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] big pairs: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def ensure_pairs(root: str) -> None:
    wd = os.path.join(root, "pairs_run")
    if os.path.isfile(os.path.join(root, "pairs", "manifest.json")) and json.load(
        open(os.path.join(root, "pairs", "manifest.json"))
    ).get("complete"):
        return
    cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", f"--workdir={wd}", "--config.mode=pairs",
           "--config.pairs.seed=0", f"--config.pairs.dir={os.path.join(root, 'pairs')}",
           f"--config.pairs.num_pairs={STUDY_PAIRS}"]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] pairs: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


# ----------------------------------------------------------------------------------------------------------
# Tables


def _stats(vals: list[float]) -> tuple[float, float, int]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if not n:
        return float("nan"), float("nan"), 0
    m = sum(vals) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    return m, sd, n


def _cell(vals, f) -> str:
    m, sd, n = _stats(vals)
    if not n:
        return "–"
    if n == 1:
        return f.format(m) + " (1 seed)"
    return f"{f.format(m)} ± {f.format(sd)}"


def beyond_noise(a: list[float], b: list[float]) -> tuple[float, float, bool]:
    """(mean(a) − mean(b), 2·SE of the difference, |Δ| > 2·SE): Welch's standard error, ≥ 2 seeds each."""
    ma, sa, na = _stats(a)
    mb, sb, nb = _stats(b)
    if na < 2 or nb < 2:
        return ma - mb, float("nan"), False
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    return ma - mb, 2 * se, abs(ma - mb) > 2 * se


def load_results(root: str) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    rdir = os.path.join(root, "rows")
    for d in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
        f = os.path.join(rdir, d, "row.json")
        if os.path.isfile(f):
            r = json.load(open(f))
            out.setdefault((r["table"], r["name"]), []).append(r)
    return out


def table(results, table_id: str, order: list[tuple[str, str]], title: str) -> str:
    head = "| row | seeds | " + " | ".join(h for _, h, _ in METRICS) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(METRICS) + 2)]
    for name, label in order:
        rs = results.get((table_id, name), [])
        if not rs:
            continue
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        cells = [_cell([r["metrics"].get(k) for r in rs], f) for k, _, f in METRICS]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(results, pairs: list[tuple[tuple[str, str], tuple[str, str], str]]) -> str:
    lines = ["| comparison | metric | Δ mean (a − b) | 2·SE | beyond noise |", "|---|---|---|---|---|"]
    for a, b, label in pairs:
        ra, rb = results.get(a, []), results.get(b, [])
        if not ra or not rb:
            continue
        for k in ("fd", "prompt_acc"):
            d, two_se, sig = beyond_noise([r["metrics"][k] for r in ra], [r["metrics"][k] for r in rb])
            lines.append(f"| {label} | {k} | {d:+.3f} | {two_se:.3f} | {'yes' if sig else 'no'} |")
    return "\n".join(lines)


def tables(root: str) -> str:
    res = load_results(root)
    versions = sorted({r["version"] for rs in res.values() for r in rs})
    parts = [f"Rows finished: {sum(len(v) for v in res.values())}; code version(s): {', '.join(versions)}", ""]
    parts.append(table(res, "t1", T1, f"Table 1 analogue: stage 1, {S1} steps × batch 64, same pairs"))
    res_x = {**res, **{("t1", n): v for (t, n), v in res.items() if t == "t1x"}}
    parts += ["", table(res_x, "t1", [(n, lab) for n, lab, _ in T1X], "Table 1, the latent rows without the L1 term")]
    parts += ["", comparisons(res, [(("t1", "e_latent_lpips"), ("t1", "mse"), "E-LatentLPIPS vs MSE"),
                                    (("t1", "e_latent_lpips"), ("t1", "latent_lpips"), "E-LatentLPIPS vs LatentLPIPS"),
                                    (("t1", "e_latent_lpips_star"), ("t1", "latent_lpips"),
                                     "E-LatentLPIPS* vs LatentLPIPS"),
                                    (("t1", "pseudo_huber"), ("t1", "mse"), "Pseudo-Huber vs MSE")])]  # fmt: skip
    t2 = [("base", f"stage-1 base ({BASE_STEPS} steps)")] + [(n, lab) for n, lab, _ in T2]
    parts += ["", table(res, "t2", t2, f"Table 2 analogue: stage 2, {S2} steps × batch 64 from one stage-1 generator")]
    parts += ["", comparisons(res, [(("t2", "full"), ("t2", "control"), "full stage 2 vs control")])]
    t2b = t2 + [T2B_NOCLIP[:2]]
    parts += ["", table(res, "t2b", t2b, f"Table 2 analogue at {S2B} stage-2 steps × batch 64 (D as configs/mnist.py "
                                        "sets it now), from one stage-1 generator")]  # fmt: skip
    parts += ["", comparisons(res, [(("t2b", "full"), ("t2b", "control"), f"full stage 2 vs control, {S2B} steps")]
                  + [(("t2b", n), ("t2b", "control"), f"{lab} vs control, {S2B} steps") for n, lab, _ in T2
                     if n not in ("control", "full")] + [(("t2b", T2B_NOCLIP[0]), ("t2b", "control"),
                                                          f"{T2B_NOCLIP[1]} vs control, {S2B} steps")])]  # fmt: skip
    op = [("full", "default (full stage 2)")] + [(n, lab) for n, lab, _ in OPEN]
    res_open = dict(res)
    if ("t2", "full") in res:
        res_open[("open", "full")] = res[("t2", "full")]
    parts += ["", table(res_open, "open", op, f"Open choices: stage 2, {S2} steps, from the Table-2 generator")]
    parts += ["", comparisons(res_open, [(("open", n), ("open", "full"), lab) for n, lab, _ in OPEN])]
    if any(t == "t6" for t, _ in res):
        parts += ["", t6_table(res)]
    fig5 = os.path.join(root, "fig5", "fig5.json")
    if os.path.isfile(fig5):
        parts += ["", fig5_table(json.load(open(fig5)))]
    return "\n".join(parts)


def _t6_points(res) -> list[tuple[int, int, dict]]:
    """(training pairs, steps, metrics) of the finished Table 6 rows."""
    out = []
    for name, _, n, steps in T6:
        for r in res.get(("t6", name), []):
            out.append((n or T6_SET - 64, steps, r["metrics"]))
    return out


def t6_table(res) -> str:
    cols = (("fd", "FD ↓", "{:.2f}"), ("prompt_acc", "prompt acc ↑", "{:.3f}"),
            ("fd_precision", "precision", "{:.3f}"), ("fd_recall", "recall", "{:.3f}"),
            ("teacher_dist", "dist. to teacher ↓", "{:.4f}"), ("ema_distill", "held-out distill (EMA) ↓", "{:.4f}"),
            ("train_img_per_s", "train img/s", "{:.0f}"))  # fmt: skip
    lines = ["### Table 6 analogue: stage 1 (configs/mnist.py) vs training pairs and steps, batch 64, seed 0", "",
             "| training pairs | steps | " + " | ".join(h for _, h, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for n, steps, m in _t6_points(res):
        cells = [f.format(m[k]) if m.get(k) is not None else "—" for k, _, f in cols]
        lines.append(f"| {n:,} | {steps:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_curve(long_wd: str) -> list[tuple[int, dict]]:
    """(step, metrics) of a configs/mnist_long.py run's stage-1 evaluations (`eval.every`, all 500 captions): the
    EMA along one 10k-step schedule, not runs of those lengths."""
    out = []
    for f in sorted(glob.glob(os.path.join(long_wd, "eval", "stage1_step_*_subset500.json"))):
        ev = json.load(open(f))
        out.append((int(ev["step"]), ev["metrics"]))
    return out


def t6_plot(root: str, res, teacher: dict | None = None, curve: list[tuple[int, dict]] | None = None) -> str | None:
    """FD and prompt accuracy vs training pairs (at 1k steps) and vs steps (on all pairs), log x axes;
    `teacher`: the teacher's 50-step row (dashed line) if known; `curve`: the 10k-step run's EMA along its schedule
    (`long_curve`, dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    pts = _t6_points(res)
    if not pts:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    big = max(n for n, _, _ in pts)
    for col, (xs, sel, xlabel) in enumerate(((lambda p: p[0], lambda p: p[1] == 1000, "training pairs (1k steps)"),
                                             (lambda p: p[1], lambda p: p[0] == big, f"steps ({big:,} pairs)"))):
        chosen = sorted((p for p in pts if sel(p)), key=xs)
        for row, (k, label) in enumerate((("fd", "FD (world features) ↓"), ("prompt_acc", "prompt accuracy ↑"))):
            ax = axes[row, col]
            ax.plot([xs(p) for p in chosen], [p[2][k] for p in chosen], "o-", label="stage 1 EMA, one run each")
            if col == 1 and curve:
                ax.plot([c[0] for c in curve], [c[1][k] for c in curve], "s:", c="tab:orange", ms=4,
                        label="the 10k-step run's EMA along its schedule")  # fmt: skip
            if teacher and k in teacher:
                ax.axhline(teacher[k], ls="--", c="k", lw=1, label="teacher, 50-step ODE")
            ax.set_xscale("log")
            if k == "fd":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ticks = sorted({xs(p) for p in chosen})  # the runs' own; the curve's where no run's label is within 1.4×
            for c in ({c[0] for c in curve} if col == 1 and curve else set()):
                if all(max(c, x) / min(c, x) >= 1.4 for x in ticks):
                    ticks.append(c)
            ax.set_xticks(sorted(ticks))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            for p in chosen:
                ax.annotate(f"{p[2][k]:.3g}", (xs(p), p[2][k]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0, 1].legend(fontsize=7)
    fig.suptitle("MNIST world, Table 6 analogue: stage 1 vs pairs and steps (batch 64, seed 0)")
    fig.tight_layout()
    out = os.path.join(root, "table6.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------
# Fig. 5: single-latent reconstruction


FIG5_LOSSES = (("mse", "MSE"), ("latent_lpips", "LatentLPIPS"), ("e_latent_lpips", "E-LatentLPIPS"))
FIG5_SHOW = (0, 10, 30, 100, 300, 1000)


def fig5(root: str, seeds=(0, 1, 2), steps: int = 1000, lr: float = 0.05) -> dict:
    """Optimise a N(0, 1) latent toward a held-out digit's VAE latent with Adam under each distance (perceptual
    distances without the L1 term, so the distance alone decides), from the same start; decode the trajectory."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from PIL import Image

    from d2g_jax.losses.elatentlpips import e_latent_lpips, load_latent_lpips
    from d2g_jax.models.vae import load_vae
    from d2g_jax.world import data as wdata
    from d2g_jax.world import mnist as world

    out_dir = os.path.join(root, "fig5")
    os.makedirs(out_dir, exist_ok=True)
    folder = world.DEFAULT_DIR
    vae, vvars = load_vae(os.path.join(folder, "pipeline"))
    vvars = jax.tree.map(jnp.asarray, vvars)
    _, lp = load_latent_lpips(os.path.join(folder, "latent_lpips"), "mnist")
    held = wdata.world_splits(0)["heldout"]
    enc = jax.jit(lambda x: vae.apply(vvars, x, method="encode_latents"))
    dec = jax.jit(lambda z: vae.apply(vvars, z, method="decode_latents"))
    to_u8 = lambda x: np.asarray(np.clip((np.asarray(x) + 1) * 127.5, 0, 255).round(), np.uint8)

    def dist(kind, z, target, rng):
        if kind == "mse":
            return jnp.mean((z - target) ** 2)
        mode = "plain" if kind == "latent_lpips" else "ensemble"
        return jnp.mean(e_latent_lpips(lp, z, target, rng, preset="bgco", l1=False, encoder="mnist", mode=mode))

    results = {"steps": steps, "lr": lr, "optimizer": "adam", "augment": "bgco", "l1": False, "runs": []}
    for seed in seeds:
        idx = int(np.random.default_rng(seed).integers(len(held)))
        img = jnp.asarray(held.images[idx : idx + 1], jnp.float32) / 127.5 - 1
        target = enc(img)
        z0 = jax.random.normal(jax.random.PRNGKey(1000 + seed), target.shape, jnp.float32)
        rows_img = []
        run = {"seed": seed, "heldout_index": idx, "caption": held.captions[idx]}
        for kind, _ in FIG5_LOSSES:
            tx = optax.adam(lr)

            @jax.jit
            def step(z, opt, k, kind=kind, target=target, tx=tx):
                loss, g = jax.value_and_grad(lambda v: dist(kind, v, target, k))(z)
                upd, opt = tx.update(g, opt, z)
                return optax.apply_updates(z, upd), opt, loss

            z, opt = z0, tx.init(z0)
            shots = {0: z0}
            for i in range(1, steps + 1):
                z, opt, _ = step(z, opt, jax.random.fold_in(jax.random.PRNGKey(seed), i))
                if i in FIG5_SHOW:
                    shots[i] = z
            final = float(jnp.mean((z - target) ** 2))
            pix = np.asarray(dec(z), np.float32)
            ref = np.asarray(dec(target), np.float32)
            psnr = float(10 * np.log10(4.0 / max(np.mean((pix - ref) ** 2), 1e-12)))
            run[kind] = {"latent_mse": final, "psnr_vs_target_decode": psnr}
            rows_img.append(np.concatenate([to_u8(dec(shots[i]))[0] for i in FIG5_SHOW if i in shots]
                                           + [to_u8(img)[0]], axis=1))  # fmt: skip
        grid = np.concatenate(rows_img, axis=0)
        path = os.path.join(out_dir, f"fig5_seed{seed}.png")
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
        run["png"] = path
        results["runs"].append(run)
        print(f"fig5 seed {seed}: " + ", ".join(f"{k} latent MSE {run[k]['latent_mse']:.4f}" for k, _ in FIG5_LOSSES),
              flush=True)  # fmt: skip
    with open(os.path.join(out_dir, "fig5.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def grids(root: str, seed: int = 0, num: int = 16) -> list[str]:
    """One PNG per table: the teacher's 50-step ODE on top, then each finished row's one-step student (seed `seed`),
    on the same `num` held-out captions (spread over the digits) and noise
    (`<root>/grids/table{1,2,_open}_s<seed>.png`)."""
    import jax
    import numpy as np
    from PIL import Image

    from d2g_jax import sharding as shd
    from d2g_jax.data.prompts import read_prompts
    from d2g_jax.generate import OneStepSampler, noise_for_seeds
    from d2g_jax.workdir import latest_export
    from d2g_jax.world import mnist as world

    res = load_results(root)
    teacher = os.path.join(world.DEFAULT_DIR, "pipeline")
    found = [os.path.join(root, "rows", d, "world", "heldout", "captions.jsonl")
             for d in sorted(os.listdir(os.path.join(root, "rows")))]  # every row writes the same held-out captions
    captions = next((f for f in found if os.path.isfile(f)), found[0] if found else "")
    every = read_prompts(captions, field="caption")
    prompts = every[:: max(len(every) // num, 1)][:num]  # the held-out set is sorted by digit: a spread of them
    mesh = shd.make_mesh(-1, 1)
    z = noise_for_seeds([2024 + i for i in range(num)], (8, 8, 4))
    out, top = [], None
    os.makedirs(os.path.join(root, "grids"), exist_ok=True)
    t2_order = [(n, lab) for n, lab, _ in T2]
    for tid, order in (("t1", T1 + [(n, lab) for n, lab, _ in T1X]), ("t2", t2_order), ("t2b", t2_order),
                       ("open", [(n, lab) for n, lab, _ in OPEN])):  # fmt: skip
        strips, labels = [], []
        for name, label in order:
            table_id = "t1x" if name.endswith("_nol1") else tid
            r = [x for x in res.get((table_id, name), []) if x["seed"] == seed]
            if not r:
                continue
            unet = latest_export(os.path.join(root, "rows", r[0]["id"], "export"))
            sampler = OneStepSampler.load(teacher, unet, resolution=32, batch_size=num,
                                          mesh=mesh, dtype="float32", with_teacher=top is None)  # fmt: skip
            if top is None:
                top = sampler.teacher_images(z, prompts, 3.0, 50)
            strips.append(np.concatenate(list(sampler.images(z, prompts)), axis=1))
            labels.append(label)
            jax.clear_caches()
        if not strips:
            continue
        grid = np.concatenate([np.concatenate(list(top), axis=1)] + strips, axis=0)
        path = os.path.join(root, "grids", f"table{tid[1:] if tid != 'open' else '_open'}_s{seed}.png")
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
        with open(path[:-4] + ".txt", "w") as f:
            f.write("rows, top to bottom: teacher 50-step ODE; " + "; ".join(labels) + "\ncaptions: "
                    + " | ".join(prompts) + "\n")  # fmt: skip
        out.append(path)
        print("grid:", path, flush=True)
    return out


def fig5_table(res: dict) -> str:
    lines = [f"### Fig. 5 analogue: one latent, Adam lr {res['lr']}, {res['steps']} steps, no L1 term",
             "", "| distance | final latent MSE to target | PSNR of decode vs target's decode (dB) |", "|---|---|---|"]
    for kind, label in FIG5_LOSSES:
        mse = [r[kind]["latent_mse"] for r in res["runs"]]
        psnr = [r[kind]["psnr_vs_target_decode"] for r in res["runs"]]
        lines.append(f"| {label} | {_cell(mse, '{:.4f}')} | {_cell(psnr, '{:.1f}')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/d2g_fidelity")
    ap.add_argument("--base", default="", help="a finished configs/mnist.py workdir whose stage 1 is the Table-2 "
                    f"generator (its stage 1 must be {BASE_STEPS} steps); default: the study makes it (row t2_base_s0)")
    ap.add_argument("--only", default="", help="comma-separated subset of t1, t1x, t2, t2b, open, fig5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tables", action="store_true", help="only print/write the tables of the finished rows")
    ap.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    ap.add_argument("--grids", action="store_true", help="only draw the sample grids of the finished rows (seed 0)")
    ap.add_argument("--big_pairs", default="", help="the Table 6 analogue's 49,152-pair set (default <root>/pairs48k; "
                    "made when missing)")  # fmt: skip
    ap.add_argument("--long", default="", help="a configs/mnist_long.py workdir: its stage-1 step-10k evaluation is "
                    "the Table 6 analogue's 10k-step row (else the row is run)")  # fmt: skip
    ap.add_argument("--teacher", default="", help="a report.json whose teacher row is drawn in the Table 6 plot")
    ap.add_argument("--host_devices", type=int, default=0, help="config.cpu.host_devices of the rows (0: the config)")
    a = ap.parse_args()
    HOST_DEVICES[0], BIG_PAIRS[0] = a.host_devices, a.big_pairs
    root = os.path.abspath(a.root)
    seeds = tuple(int(s) for s in a.seeds.split(","))
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    todo = [r for r in rows(root, a.base, seeds) if not only or r["table"] in only]
    if a.long:  # the 10k-step row is the long recipe's stage 1
        todo = [r for r in todo if not (r["table"] == "t6" and r["name"] == T6_LONG)]
        lr = long_row(os.path.abspath(a.long))
        if lr:
            d = os.path.join(root, "rows", lr["id"])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "row.json"), "w") as f:
                json.dump(lr, f, indent=1)
    if a.grids:
        grids(root)
        return
    if a.list:
        for r in todo:
            print(r["id"], " ".join(command(r, root, a.base)[1:]))
        return
    if not a.tables:
        if any(r["table"] == "t6" for r in todo):
            ensure_big_pairs(root)
        if any(r["table"] != "t6" for r in todo):
            ensure_pairs(root)
        if not only or "fig5" in only:
            if not os.path.isfile(os.path.join(root, "fig5", "fig5.json")):
                fig5(root, seeds)
        for r in todo:
            run_row(r, root, a.base)
    text = tables(root)
    teacher = None
    if a.teacher:
        teacher = next((v for k, v in json.load(open(a.teacher)).items() if k.startswith("teacher, 50-step")), None)
    if not only or "t6" in only:
        png = t6_plot(root, load_results(root), teacher, long_curve(os.path.abspath(a.long)) if a.long else None)
        if png:
            print(f"Table 6 plot: {png}")
    with open(os.path.join(root, "tables.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
