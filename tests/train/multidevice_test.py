"""Sharding and multi-process acceptance of the stage-1 trainer on CPU.

* One training step on 8 virtual CPU devices (mesh data×fsdp = 4×2 and 1×8) gives the same loss, gradient norm and
  updated parameters as on 1 device, within fp32 tolerance.
* Two processes joined by `jax.distributed` (coordinator on localhost, 2 CPU devices each) run `d2g_jax.main` for
  a few steps, write the step's checkpoint and the metrics.

The device count of a JAX process is fixed when its backend starts, so every configuration runs in a fresh
subprocess with its own `XLA_FLAGS` (this pytest process keeps whatever tests/conftest.py gave it). The teacher and
its pairs are generated once per module and shared by every run (`teacher.tiny=False`, `teacher.path`, `pairs.dir`).
"""

import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from d2g_jax import pipeline
from d2g_jax.workdir import pairs_dir, teacher_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 400

# Compile time dominates these runs (the tiny U-Net's backward pass plus E-LatentLPIPS take ~50 s per mesh at
# XLA's default LLVM optimisation level on a 2-core CPU, ~25 s at level 0). The level changes code generation
# only, and every run being compared uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _load_tiny():
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _env(num_devices: int) -> dict[str, str]:
    """Environment of a CPU JAX subprocess with `num_devices` virtual devices."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    flags = re.sub(r"--xla_backend_optimization_level=\S+", "", flags).split()
    if num_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    flags.append(FAST_COMPILE)
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    return env


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


def _wait_all(procs: list[subprocess.Popen], logs: list[str], timeout_s: float) -> None:
    """Waits for every process; on the first failure or at the deadline stops the others and fails with logs
    (polling, as launch/local_multiprocess.sh does: a crashed process would leave the others in a collective)."""
    deadline = time.monotonic() + timeout_s
    failure = None
    try:
        while failure is None and any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout_s} s"
            else:
                time.sleep(0.5)
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failure is None and failed:
            failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
    finally:
        for p in procs:  # only the processes this test started; also on KeyboardInterrupt
            if p.poll() is None:
                p.kill()
                p.wait()
    if failure is not None:
        details = "\n".join(f"--- process {i} (exit {p.returncode}), last lines of {log}:\n{_tail(log)}"
                            for i, (p, log) in enumerate(zip(procs, logs)))  # fmt: skip
        pytest.fail(f"{failure}\n{details}")


@pytest.fixture(scope="module")
def teacher_and_pairs(tmp_path_factory):
    """The tiny random teacher and 32 of its pairs (24 train, 8 held out), shared by every run of this module."""
    root = str(tmp_path_factory.mktemp("multidevice_teacher"))
    c = _load_tiny()
    c.pairs.num_pairs = 32  # ≥ batch 8 + holdout 8
    c.pairs.num_steps = 2  # teacher ODE steps: any target will do here, and fewer is faster
    manifest = pipeline.run_pairs(c, root)
    assert manifest["complete"] and manifest["num_pairs"] == 32
    return teacher_path(c, root), pairs_dir(c, root)


# ----------------------------------------------------------------------------------------------------------
# One step on 1 device vs 8 devices.

# Runs in a subprocess: `python one_step.py ROOT TEACHER PAIRS OUT DATAxFSDP...`; for each mesh it builds a
# Trainer (own workdir), takes ONE step from the initial state on the first batch and saves the initial and the
# updated generator params (<mesh>.npz) and the metrics, param PartitionSpecs and mesh (<mesh>.json).
ONE_STEP = r'''
import importlib.util, json, os, sys
import jax
import numpy as np

root, teacher, pairs, out = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(root, "configs", "tiny.py"))
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from d2g_jax.train.trainer import Trainer

def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

for mesh in sys.argv[5:]:
    data, fsdp = (int(v) for v in mesh.split("x"))
    c = mod.get_config()
    c.teacher.tiny, c.teacher.path, c.pairs.dir = False, teacher, pairs
    c.pairs.num_steps = 2  # as the shared pairs were made
    c.train.eval_every = c.train.sample_every = 0
    c.mesh.data, c.mesh.fsdp = data, fsdp
    for k, v in json.loads(os.environ["ONE_STEP_OVERRIDES"]).items():
        c.train[k] = v
    workdir = os.path.join(out, "run_" + mesh)
    os.makedirs(workdir)
    tr = Trainer(c, workdir, teacher, pairs)
    state = tr.initial_state()
    init = flat(state.params)
    specs = {jax.tree_util.keystr(p): [str(a) for a in x.sharding.spec]
             for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    batch = tr.global_batch(next(tr.loader))
    state, metrics = tr.step_fn(state, tr.frozen, batch)
    np.savez(os.path.join(out, mesh + ".npz"), **{"new" + k: v for k, v in flat(state.params).items()},
             **{"old" + k: v for k, v in init.items()})
    with open(os.path.join(out, mesh + ".json"), "w") as f:
        json.dump({"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}, "specs": specs,
                   "mesh": dict(tr.mesh.shape), "devices": jax.device_count()}, f)
    print("one_step", mesh, json.dumps({k: float(v) for k, v in jax.device_get(metrics).items()}), flush=True)
'''

# Adam's first update is -lr·g/(|g| + eps) (bias-corrected m = g, v = g²), plus decoupled weight decay. With the
# default eps = 1e-8 that is lr·sign(g) for almost every element: it hides gradient errors (any positive scaling of
# g gives the same step) and amplifies the fp32 reduction-order noise of the few elements with |g| ~ eps by
# lr/(4·eps) = 2500× (measured: ~8 of 0.8M elements then differ by up to ~lr between meshes). eps = 1 makes the
# update a smooth function of the gradient (|∂u/∂g| ≤ lr/eps), and lr = 1 makes it large (u ≈ −g/(1 + |g|), up
# to ~0.6 here) next to the fp32 rounding of the parameters (|p| ≲ 1), so the parameters after the step carry the
# gradient itself. Same code path and step function; only two constants of the optimiser differ.
OVERRIDES = {"lr": 1.0, "adam_eps": 1.0}
MESHES_8 = ("4x2", "1x8")


@pytest.fixture(scope="module")
def one_step_runs(teacher_and_pairs, tmp_path_factory):
    """{mesh: (npz, json)} for 1 device (1x1) and 8 devices (4x2 and 1x8, one process: one start-up)."""
    teacher, pairs = teacher_and_pairs
    out = tmp_path_factory.mktemp("one_step")
    script = out / "one_step.py"
    script.write_text(ONE_STEP)
    jobs = {1: ["1x1"], 8: list(MESHES_8)}
    procs, logs = [], []
    for n, meshes in jobs.items():  # the two subprocesses run side by side (2 cores)
        log = str(out / f"devices_{n}.log")
        env = _env(n)
        env["ONE_STEP_OVERRIDES"] = json.dumps(OVERRIDES)
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(script), ROOT, teacher, pairs, str(out), *meshes],
                                          cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))  # fmt: skip
        logs.append(log)
    _wait_all(procs, logs, TIMEOUT_S)
    runs = {}
    for meshes in jobs.values():
        for m in meshes:
            with open(out / f"{m}.json") as f:
                runs[m] = (np.load(out / f"{m}.npz"), json.load(f))
    return runs


def test_one_device_run_is_unsharded(one_step_runs):
    _, info = one_step_runs["1x1"]
    assert info["devices"] == 1 and info["mesh"] == {"data": 1, "fsdp": 1}
    assert info["metrics"]["finite"] == 1.0 and info["metrics"]["lr"] == pytest.approx(OVERRIDES["lr"])


@pytest.mark.parametrize("mesh", MESHES_8)
def test_sharded_step_equals_single_device(one_step_runs, mesh):
    ref, ref_info = one_step_runs["1x1"]
    got, info = one_step_runs[mesh]
    data, fsdp = (int(v) for v in mesh.split("x"))
    assert info["devices"] == 8 and info["mesh"] == {"data": data, "fsdp": fsdp}

    # Not vacuous: most parameters (every large one) are split over `fsdp`, none over `data`.
    specs = info["specs"]
    split = [k for k, s in specs.items() if "fsdp" in s]
    assert len(split) > len(specs) // 2, f"only {len(split)} of {len(specs)} params are split over fsdp"
    assert not any("data" in s for s in specs.values())

    # Loss and gradient norm: one fp32 forward/backward over the same batch; the sharded run sums partial results
    # in another order (batch over 8 devices, all-gathered weights), ~1e-7 relative each.
    m, m_ref = info["metrics"], ref_info["metrics"]
    assert m["finite"] == 1.0
    for k in ("loss", "distill", "mse", "grad_norm"):
        np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-5, err_msg=k)

    # Parameters. Same starting point exactly; the step u = p_new − p_old must match. Its error is the gradient's
    # fp32 reduction-order error (|∂u/∂g| ≤ lr/eps = 1, see OVERRIDES) plus the rounding of p_new (ulp(|p| ≲ 1)
    # ≤ 1.2e-7). The gradient sums ~10⁴–10⁵ products per element (batch × positions) with cancellation, through
    # ~20 layers, so its error is ~1e-6 of the leaf's gradient scale, not of the element (measured: max|Δu| ≤
    # 1e-5·max|u| and ‖Δu‖ ≤ 7e-6·‖u‖ per leaf). Tolerance per leaf: |Δu| ≤ 1e-4·max|u| element-wise and
    # ‖Δu‖ ≤ 1e-4·‖u‖ (≥ 10× margin), while a wrong gradient (a missing or extra cross-device reduction, other
    # batch rows) is off by O(1) relative.
    tol = 1e-4
    keys = sorted(k[3:] for k in ref.files if k.startswith("new"))
    assert keys == sorted(k[3:] for k in got.files if k.startswith("new"))
    assert len(keys) == len(specs)
    u_ref = {k: ref["new" + k] - ref["old" + k] for k in keys}
    assert max(float(np.abs(u).max()) for u in u_ref.values()) > 1e-3, "the step did not move the parameters"
    moved = sum(int(np.count_nonzero(u)) for u in u_ref.values()) / sum(u.size for u in u_ref.values())
    assert moved > 0.9
    worst_elem, worst_norm = (0.0, ""), (0.0, "")
    for k in keys:
        np.testing.assert_array_equal(got["old" + k], ref["old" + k], err_msg=f"initial {k}")
        u, ur = got["new" + k] - got["old" + k], u_ref[k]
        scale = float(np.abs(ur).max())
        assert scale > 0, f"{k} did not move"
        elem = float(np.abs(u - ur).max()) / scale
        norm = float(np.linalg.norm(u - ur) / np.linalg.norm(ur))
        worst_elem, worst_norm = max(worst_elem, (elem, k)), max(worst_norm, (norm, k))
        assert norm <= tol, f"{k}: ‖Δu‖/‖u‖ = {norm:.3g} > {tol}"
        np.testing.assert_allclose(u, ur, rtol=0, atol=tol * scale, err_msg=k)
        np.testing.assert_allclose(got["new" + k], ref["new" + k], rtol=0, atol=tol * scale, err_msg=k)
    rel = lambda key: abs(m[key] - m_ref[key]) / abs(m_ref[key])
    print(f"\n{mesh}: rel. Δloss = {rel('loss'):.2g}, rel. Δgrad_norm = {rel('grad_norm'):.2g}, "
          f"max leaf max|Δu|/max|u| = {worst_elem[0]:.2g} ({worst_elem[1]}), "
          f"max leaf ‖Δu‖/‖u‖ = {worst_norm[0]:.2g} ({worst_norm[1]})")


# ----------------------------------------------------------------------------------------------------------
# Two processes, jax.distributed on localhost.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_completes_steps(teacher_and_pairs, tmp_path):
    """`launch/local_multiprocess.sh` in Python: 2 processes × 2 CPU devices = a 4-device mesh with fsdp=4, so
    the parameters (and the batch) are split across the two processes; 2 steps, a checkpoint at step 2."""
    teacher, pairs = teacher_and_pairs
    workdir = tmp_path / "run"
    port = _free_port()
    # loss.kind=mse: the multi-process paths (coordinator, per-process batches, collectives across processes,
    # Orbax multi-process save) do not depend on the loss, and it compiles ~1/3 faster than E-LatentLPIPS,
    # whose sharded equivalence is tested above.
    args = [f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", f"--workdir={workdir}", "--config.mode=train",
            "--config.teacher.tiny=False", f"--config.teacher.path={teacher}", f"--config.pairs.dir={pairs}",
            "--config.pairs.num_steps=2", "--config.train.num_steps=2", "--config.train.ckpt_every=2",
            "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.sample_every=0", "--config.mesh.data=1",
            "--config.mesh.fsdp=4", "--config.loss.kind=mse", "--config.stage2.num_steps=0",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]  # fmt: skip
    procs, logs = [], []
    for i in range(2):
        log = str(tmp_path / f"proc_{i}.log")
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", "d2g_jax.main", *args, f"--process_id={i}"],
                                          cwd=ROOT, env=_env(2), stdout=f, stderr=subprocess.STDOUT))  # fmt: skip
        logs.append(log)
    _wait_all(procs, logs, TIMEOUT_S)

    # (mesh.data=1 × mesh.fsdp=4 is accepted only with exactly 4 global devices, i.e. both processes joined.)
    ckpt = workdir / "stage1" / "checkpoints"
    assert (ckpt / "2").is_dir(), f"no checkpoint of step 2 in {ckpt}: {sorted(os.listdir(ckpt))}"
    assert not any("tmp" in name for name in os.listdir(ckpt)), os.listdir(ckpt)  # committed, not half-written
    with open(workdir / "stage1" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r
    assert rows[1]["loss"] != rows[0]["loss"]  # the parameters changed between the steps


# ----------------------------------------------------------------------------------------------------------
# Stage 2: D and its Adam state are FSDP-sharded like G (this pytest process has 8 CPU devices).


def test_stage2_discriminator_is_fsdp_sharded(teacher_and_pairs, tmp_path):
    import jax

    from d2g_jax.train.stage2_trainer import Stage2Trainer

    teacher, pairs = teacher_and_pairs
    assert jax.device_count() == 8
    c = _load_tiny()
    c.teacher.tiny, c.teacher.path, c.pairs.dir = False, teacher, pairs
    c.pairs.num_steps = 2  # as the shared pairs were made
    c.mesh.data, c.mesh.fsdp = 1, 8
    tr = Stage2Trainer(c, str(tmp_path / "run"), teacher, pairs)
    flat = lambda tree: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    specs = {k: tuple(s.spec) for k, s in flat(tr.state_sh.disc).items()}
    shapes = {k: a.shape for k, a in flat(tr.abstract_state.disc).items()}
    assert specs.keys() == shapes.keys()
    # Every parameter with a dimension of ≥ 32 divisible by 8 (all conv/dense kernels here) is split over fsdp.
    big = [k for k, shp in shapes.items() if len(shp) >= 2 and max(shp) >= 32 and max(shp) % 8 == 0]
    assert len(big) > 50 and all("fsdp" in specs[k] for k in big), [k for k in big if "fsdp" not in specs[k]][:5]
    assert any("z_conv" in k for k in big) and any("readout_" in k and "kernel" in k for k in big)
    # D's Adam moments mirror D's shardings; G's are unchanged by D's presence.
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(tr.state_sh.disc_opt)[0]
          if "mu" in jax.tree_util.keystr(p)]  # fmt: skip
    assert len(mu) == len(specs)
    assert sum("fsdp" in tuple(s.spec) for s in mu) == sum("fsdp" in s for s in specs.values())
    assert sum("fsdp" in tuple(s.spec) for s in jax.tree.leaves(tr.state_sh.params)) > 50
