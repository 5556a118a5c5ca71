"""The scaling study's fields (FIDELITY.md, the Table 6 analogue; BENCHMARKS.md, the CPU throughput):
`train.max_pairs` trains on a prefix of one pair set and keeps its held-out pairs, `cpu.host_devices` makes the host
CPU several JAX devices before JAX starts, and both refuse bad values by name."""

import os
import subprocess
import sys

import numpy as np
import pytest
from train_test import _config  # the tiny config on conftest's `data`: 48 pairs, 40 train + 8 held out

from configs import tiny
from d2g_jax.validate import ConfigError, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_max_pairs_trains_on_a_prefix_and_keeps_the_holdout(data, tmp_path):
    from d2g_jax.train.trainer import Trainer

    teacher, pairs = data
    c = _config(teacher, pairs)
    full = Trainer(c, str(tmp_path / "full"), teacher, pairs)
    c.train.max_pairs = 12
    tr = Trainer(c, str(tmp_path / "prefix"), teacher, pairs)
    assert (full.n_train, tr.n_train) == (40, 12)
    seen = set()
    for _ in range(12):  # 12 batches of 8 = 8 epochs of the 12-pair prefix
        seen.update(int(i) for i in next(tr.loader)["index"])
    assert seen == set(range(12))  # every prefix pair, nothing past it
    seen_full = set()
    for _ in range(10):
        seen_full.update(int(i) for i in next(full.loader)["index"])
    assert max(seen_full) >= 12 and max(seen_full) < 40
    # The held-out pairs are the set's last 8 for both: rows at several pair counts share them.
    a, b = full.holdout_pairs(8), tr.holdout_pairs(8)
    last = [tr.source[i] for i in range(40, 48)]
    for got in (a, b):
        np.testing.assert_array_equal(got["latent"], np.stack([r["latent"] for r in last]))
        np.testing.assert_array_equal(got["noise"], np.stack([r["noise"] for r in last]))


def test_max_pairs_larger_than_the_set_is_refused(data, tmp_path):
    from d2g_jax.train.trainer import Trainer

    teacher, pairs = data
    c = _config(teacher, pairs)
    c.train.max_pairs = 41
    with pytest.raises(ValueError, match=r"config.train.max_pairs=41: .* has 48 pairs, 8 of them held out, so at "
                                         r"most 40 train"):  # fmt: skip
        Trainer(c, str(tmp_path / "run"), teacher, pairs)


@pytest.mark.parametrize("field,value", [("train.max_pairs", -1), ("cpu.host_devices", -1)])
def test_validate_refuses(tmp_path, field, value):
    c = tiny.get_config()
    section, name = field.split(".")
    setattr(c[section], name, value)
    with pytest.raises(ConfigError, match=f"config.{field}={value}"):
        validate(c, str(tmp_path / "wd"))


def _devices(env_flags: str | None, n: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if env_flags is not None:
        env["XLA_FLAGS"] = env_flags
    code = ("import jax, ml_collections\nfrom d2g_jax.main import host_devices\n"
            f"c = ml_collections.ConfigDict({{'cpu': {{'host_devices': {n}}}}})\n"
            "host_devices(c)\nprint('DEVICES', jax.device_count(), jax.devices()[0].platform)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return next(ln for ln in out.stdout.splitlines() if ln.startswith("DEVICES"))


def test_host_devices_splits_the_cpu_and_xla_flags_win():
    assert _devices(None, 0) == "DEVICES 1 cpu"  # JAX's default
    assert _devices(None, 2) == "DEVICES 2 cpu"
    assert _devices("--xla_force_host_platform_device_count=3", 2) == "DEVICES 3 cpu"  # set by hand: it wins


def test_mnist_configs_use_two_host_devices_and_the_long_recipe_is_the_same_stage_one():
    """configs/mnist.py runs on 2 host devices (BENCHMARKS.md, the throughput bench); configs/mnist_long.py differs
    from it only in the budget (pairs, steps, cadence), so the Table 6 rows (configs/mnist.py + train.num_steps +
    train.max_pairs) and its stage 1 are one recipe."""
    from configs import mnist, mnist_long
    from d2g_jax.train.checkpoint import run_identity

    short, long = mnist.get_config(), mnist_long.get_config()
    assert short.cpu.host_devices == long.cpu.host_devices == 2
    a, b = run_identity(short), run_identity(long)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert diff == ["pairs.num_pairs", "stage2.num_steps", "train.num_steps"], diff


def test_jax_cache_dir_is_inside_the_workdir_and_jax_writes_there(tmp_path):
    """config.jax_cache_dir: a relative path is JAX's persistent compilation cache inside the workdir (compiled
    programs land there; the 1 s floor is lowered here so that a tiny program counts), an absolute one is kept, ""
    leaves the cache off."""
    code = ("import os, sys, jax, jax.numpy as jnp, ml_collections\nfrom d2g_jax.main import compile_cache\n"
            "wd = sys.argv[1]\n"
            "print('OFF', repr(compile_cache(ml_collections.ConfigDict({'jax_cache_dir': ''}), wd)))\n"
            "print('ABS', compile_cache(ml_collections.ConfigDict({'jax_cache_dir': '/abs/cache'}), wd))\n"
            "d = compile_cache(ml_collections.ConfigDict({'jax_cache_dir': 'jc'}), wd)\n"
            "print('DIR', d, jax.config.jax_compilation_cache_dir)\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(5.0)).block_until_ready()\n"
            "print('FILES', len(os.listdir(d)) if os.path.isdir(d) else 0)\n")  # fmt: skip
    wd = str(tmp_path / "wd")
    out = subprocess.run([sys.executable, "-c", code, wd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = dict(ln.split(" ", 1) for ln in out.splitlines() if ln.split(" ", 1)[0] in ("OFF", "ABS", "DIR", "FILES"))
    assert lines["OFF"] == "''" and lines["ABS"] == "/abs/cache"
    assert lines["DIR"] == f"{wd}/jc {wd}/jc"
    assert int(lines["FILES"]) >= 1
