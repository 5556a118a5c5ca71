"""The discriminator probe (FIDELITY.md, "Stage 2: does D learn?"): from a finished stage-1 generator of the MNIST
world, train D with the real stage-2 step (`train/stage2.make_stage2_step`, through `Stage2Trainer`'s set-up) and read
it every `--every` steps:

* D loss, mean real/fake logit and D's accuracy on the training batches (means over the window);
* on held-out pairs D never trained on (the run's last `train.holdout` pairs): the mean real/fake logit of every
  read-out map (map 0 = the U-Net's ε-map, then the multi-scale heads skip/up/out per decoder scale) and the per-image
  accuracy (the sign of an image's mean logit over the maps; real and fake halves weighted equally);
* the R1 penalty on the steps it runs, and Adam's second-moment scale of D (√mean ν over D's parameters) just before
  and after each R1 step (the first two R1 steps, then every fourth);
* with G training: G's GAN-gradient norm over its distillation-gradient norm.

Rows change one thing each against `base` (configs/mnist.py's D at batch 16 with G frozen: lr 0). Each row is its own
workdir `<root>/rows/<row>/` with `probe.jsonl` (one line per window) and `row.json` (done); a finished row is
skipped, so a rerun resumes at the next row.

    python bench/d_probe.py --base /tmp/d2g_mnist --root /tmp/d_probe                  # every row
    python bench/d_probe.py --base /tmp/d2g_mnist --root /tmp/d_probe --rows base,r1_off
    python bench/d_probe.py --root /tmp/d_probe --table                               # the markdown table
    python bench/d_probe.py --list

`--base` is a workdir with a finished stage 1 and its pairs (the MNIST job's, or `--config.mode=train
--config.stage2.num_steps=0`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FROZEN = {"stage2.lr": 0.0, "stage2.lr_end": 0.0}
# The D before issue 20 (the rows' base): R1 on StyleGAN2's sum score, clean latents at t = 0, D unclipped.
OLD_D = {"disc.r1_reduce": "sum", "disc.timestep": 0, "disc.grad_clip": 0.0}
# (row, what it changes, overrides on top of BASE). BASE: configs/mnist.py's D before issue 20 (lr 2e-4 → 1e-5 cosine,
# β (0.9, 0.999), R1 γ 0.01 every 16 from step 0, sum score, ε-map elements, t = 0: OLD_D) at batch 16, G frozen.
ROWS = [
    ("base", "the D before issue 20 (R1 on: sum score, t = 0)", {}),
    ("r1_off", "R1 off", {"disc.r1_gamma": 0.0}),
    ("r1_offset", "R1 first at step 15 (offset 15), not step 0", {"disc.r1_offset": 15}),
    ("r1_mean", "R1 on the per-location mean score (r1_reduce=mean)", {"disc.r1_reduce": "mean"}),
    ("r1_noscale", "R1 γ not scaled by the interval (γ/16 · 16 = γ)", {"disc.r1_gamma": 0.01 / 16}),
    ("betas_sdxl", "D Adam β (0, 0.99) (Table A1 SDXL)", {"disc.b1": 0.0, "disc.b2": 0.99}),
    ("lr_1e-4", "D lr 1e-4 → 1e-5 (Table A1)", {"disc.lr": 1e-4}),
    ("lr_1e-3", "D lr 1e-3", {"disc.lr": 1e-3, "disc.lr_end": 1e-4}),
    ("t_500", "D timestep 500 (clean latents → t = 500 input, no noise)", {"disc.timestep": 500}),
    ("noise_aug", "noise augmentation before D, t ∈ [0, 999] (SDXL's recipe)", {"disc.noise_aug": True}),
    ("noise_aug_lo", "noise augmentation before D, t ∈ [0, 500]",
     {"disc.noise_aug": True, "disc.noise_aug_t_max": 500}),
    ("eps_mean", "ε-map as one logit per location (channel mean)", {"disc.eps_map": "channel_mean"}),
    ("eps_off", "ε-map not a read-out (multi-scale heads alone)", {"disc.eps_map": "off"}),
    ("batch64", "batch 64", {"stage2.batch_size": 64}),
    ("mnist_noclip", "R1 mean score (base.py now) and D timestep 500, D unclipped",
     {"disc.r1_reduce": "mean", "disc.timestep": 500}),
    ("mnist", "configs/mnist.py now: R1 mean score, D timestep 500, D grad clip 10",
     {"disc.r1_reduce": "mean", "disc.timestep": 500, "disc.grad_clip": 10.0}),
]
ROW_IDS = [r[0] for r in ROWS]


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def nu_scale(opt_state) -> float:
    """√(mean ν) over every second-moment leaf of an optax Adam(W) state (None if there is none)."""
    import jax
    import numpy as np

    tot, n = 0.0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if any(getattr(k, "name", None) == "nu" for k in path):
            a = np.asarray(jax.device_get(leaf), np.float64)
            tot, n = tot + float(a.sum()), n + a.size
    return float(np.sqrt(tot / n)) if n else float("nan")


def run_row(row: str, overrides: dict, args) -> dict:
    import jax
    import numpy as np

    from configs import mnist
    from d2g_jax import pipeline
    from d2g_jax import sharding as shd
    from d2g_jax import workdir as wd
    from d2g_jax.train.stage2 import make_d_eval
    from d2g_jax.train.stage2_trainer import Stage2Trainer

    out_dir = os.path.join(args.root, "rows", row)
    os.makedirs(out_dir, exist_ok=True)
    config = mnist.get_config()
    base = {"seed": args.seed, "stage2.init_from": os.path.abspath(args.base),
            "pairs.dir": os.path.join(os.path.abspath(args.base), "pairs"), "stage2.num_steps": args.steps,
            "stage2.batch_size": args.batch, "train.holdout": args.holdout, "stage2.eval_every": 0,
            "stage2.sample_every": 0, "stage2.log_grad_parts": True,  # gan_grad_ratio (configs/mnist.py: off)
            **({} if args.g_train else FROZEN), **OLD_D, **overrides}  # fmt: skip
    for k, v in base.items():
        node = config
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    config = pipeline.resolve_world(config, out_dir)
    from d2g_jax.validate import validate

    validate(config, out_dir)
    trainer = Stage2Trainer(config, out_dir, wd.teacher_path(config, out_dir), wd.pairs_dir(config, out_dir))
    state = trainer.initial_state()
    dc = config.disc
    ev = jax.jit(make_d_eval(trainer.gen, trainer.disc, trainer.text, dc))
    hold = trainer.holdout_pairs(trainer.holdout)
    bs = args.eval_batch
    batches = [trainer.full_batch({k: v[i : i + bs] for k, v in hold.items()}) for i in range(0, trainer.holdout, bs)]
    key = shd.put_global(np.asarray(jax.random.PRNGKey(777), np.uint32), shd.replicated(trainer.mesh))

    def held_out(st):
        acc: dict[str, float] = {}
        for b in batches:
            for k, v in jax.device_get(ev(st.params, st.disc, trainer.frozen, b, key)).items():
                acc[k] = acc.get(k, 0.0) + float(v) / len(batches)
        return acc

    gamma, interval, offset = float(dc.r1_gamma), int(dc.r1_interval), int(dc.r1_offset)
    rows_path = os.path.join(out_dir, "probe.jsonl")
    open(rows_path, "w").close()
    window: dict[str, list[float]] = {}
    r1_log: list[dict] = []
    t0 = time.perf_counter()
    first = {"step": 0, **held_out(state)}
    _emit(row, first, rows_path)
    for step in range(args.steps):
        r1_due = gamma > 0 and step % interval == offset
        k_r1 = (step - offset) // interval if r1_due else -1
        watch = r1_due and (k_r1 < 2 or k_r1 % 4 == 0)
        nu_before = nu_scale(state.disc_opt) if watch else None
        batch = trainer.global_batch(next(trainer.loader))
        state, m = trainer.step_fn(state, trainer.frozen, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        for k in ("d_loss", "d_real", "d_fake", "d_acc", "d_grad_norm", "gan_grad_ratio", "distill"):
            window.setdefault(k, []).append(m[k])
        if m["r1_applied"] > 0:
            rec = {"step": step, "r1": m["r1"], "r1_term": 0.5 * gamma * interval * m["r1"],
                   "d_grad_norm": m["d_grad_norm"]}  # fmt: skip
            if watch:
                rec.update(nu_before=nu_before, nu_after=nu_scale(state.disc_opt))
            r1_log.append(rec)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, **{f"train_{k}": float(np.mean(v)) for k, v in window.items()}, **held_out(state),
                   "r1_steps": [r for r in r1_log if r["step"] > step + 1 - args.every - 1 and r["step"] <= step],
                   "elapsed_s": time.perf_counter() - t0}  # fmt: skip
            window = {}
            _emit(row, rec, rows_path)
    done = {"row": row, "overrides": overrides, "g_train": args.g_train, "steps": args.steps,
            "batch": config.stage2.batch_size, "seed": args.seed, "r1": r1_log,
            "wall_s": time.perf_counter() - t0}  # fmt: skip
    with open(os.path.join(out_dir, "row.json"), "w") as f:
        json.dump(done, f, indent=1)
    return done


def _emit(row: str, rec: dict, path: str) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    maps = sorted({int(k[3:].split("_")[0]) for k in rec if k.startswith("map") and k.endswith("_real")})
    per_map = " ".join(f"m{i} {rec[f'map{i}_real']:+.3f}/{rec[f'map{i}_fake']:+.3f}" for i in maps)
    tr = (f"train D {rec['train_d_loss']:.3f} r/f {rec['train_d_real']:+.3f}/{rec['train_d_fake']:+.3f} "
          f"acc {rec['train_d_acc']:.2f} |gD| {rec['train_d_grad_norm']:.3g} ratio {rec['train_gan_grad_ratio']:.3g} "
          if "train_d_loss" in rec else "")  # fmt: skip
    r1 = " ".join(f"R1@{r['step']} {r['r1']:.3g}" + (f" ν {r['nu_before']:.2e}→{r['nu_after']:.2e}" if "nu_before" in r
                                                     else "") for r in rec.get("r1_steps", []))  # fmt: skip
    print(f"[{row}] step {rec['step']:4d} {tr}| held-out acc {rec['acc']:.3f} (real {rec['acc_real']:.2f} fake "
          f"{rec['acc_fake']:.2f}) | {per_map} {('| ' + r1) if r1 else ''}", flush=True)  # fmt: skip


def table(root: str) -> str:
    """Markdown: one line per finished row — held-out accuracy at steps 100/250/500 (and the max), final logits."""
    lines = ["| row | change | held-out acc @100 | @250 | @500 | mean (min) from step 100 | max (step) "
             "| ε-map real/fake @end "
             "| heads real/fake @end "
             "| first R1 penalty | largest R1 penalty (step) | Adam √ν before→after first R1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    desc = {r[0]: r[1] for r in ROWS}
    for name in sorted(os.listdir(os.path.join(root, "rows"))):
        d = os.path.join(root, "rows", name)
        if not os.path.isfile(os.path.join(d, "row.json")):
            continue
        meta = json.load(open(os.path.join(d, "row.json")))
        recs = [json.loads(ln) for ln in open(os.path.join(d, "probe.jsonl")) if ln.strip()]
        at = {r["step"]: r for r in recs}
        acc = lambda s, at=at: f"{at[s]['acc']:.3f}" if s in at else "–"
        best = max(recs, key=lambda r: r["acc"])
        later = [r["acc"] for r in recs if r["step"] >= 100] or [float("nan")]
        mean = f"{sum(later) / len(later):.3f} ({min(later):.3f})"
        last = recs[-1]
        maps = sorted({int(k[3:].split("_")[0]) for k in last if k.startswith("map") and k.endswith("_real")})
        eps_on = meta["overrides"].get("disc.eps_map", "elements") != "off"
        heads = [i for i in maps if i > 0 or not eps_on]
        eps = f"{last['map0_real']:+.2f}/{last['map0_fake']:+.2f}" if eps_on else "–"
        hr = sum(last[f"map{i}_real"] for i in heads) / max(len(heads), 1)
        hf = sum(last[f"map{i}_fake"] for i in heads) / max(len(heads), 1)
        r1 = meta["r1"]
        first = f"{r1[0]['r1']:.3g}" if r1 else "–"
        big = max(r1, key=lambda r: r["r1"]) if r1 else None
        big = f"{big['r1']:.3g} ({big['step']})" if big else "–"
        nu = (f"{r1[0]['nu_before']:.1e}→{r1[0]['nu_after']:.1e}" if r1 and "nu_before" in r1[0] else "–")
        rid = name.split("+")[0]
        label = desc.get(rid, json.dumps(meta["overrides"]))
        own = {r[0]: r[2] for r in ROWS}.get(rid, {})
        extra = {k: v for k, v in meta["overrides"].items() if own.get(k, object()) != v}
        if extra:
            label += " + " + ", ".join(f"{k}={v}" for k, v in extra.items())
        if meta.get("g_train"):
            label += " (G training)"
        lines.append(f"| {name} | {label} | {acc(100)} | {acc(250)} | {acc(500)} | {mean} | "
                     f"{best['acc']:.3f} ({best['step']}) | "
                     f"{eps} | {hr:+.2f}/{hf:+.2f} | {first} | {big} | {nu} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="workdir with a finished stage 1 and its pairs")
    ap.add_argument("--root", default="/tmp/d_probe")
    ap.add_argument("--rows", default=",".join(ROW_IDS), help="comma-separated row ids (see --list)")
    ap.add_argument("--set", action="append", default=[],
                    help="extra override k=v on every row (name the rows with --name)")
    ap.add_argument("--name", default="", help="suffix of the row ids (with --set / --g_train)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=256)
    ap.add_argument("--eval_batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--g_train", action="store_true", help="G trains (stage2.lr as configured) instead of frozen")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.list:
        for r, what, ov in ROWS:
            print(f"{r:14s} {what}  {ov}")
        return
    if args.table:
        print(table(args.root))
        return
    if not args.base:
        ap.error("--base is required to run rows")
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # grain's workers read absl flags
    extra = dict(kv.split("=", 1) for kv in args.set)
    extra = {k: parse_value(v) for k, v in extra.items()}
    table_rows = {r[0]: r[2] for r in ROWS}
    for row in args.rows.split(","):
        if row not in table_rows:
            raise SystemExit(f"--rows: unknown row {row!r}; see --list")
        name = row + (f"+{args.name}" if args.name else "")
        if os.path.isfile(os.path.join(args.root, "rows", name, "row.json")):
            print(f"[{name}] done (row.json); skipped", flush=True)
            continue
        run_row(name, {**table_rows[row], **extra}, args)
    print(table(args.root))


if __name__ == "__main__":
    main()
