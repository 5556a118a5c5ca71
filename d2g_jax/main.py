"""Entry point: `python -m d2g_jax.main --config=configs/<name>.py --workdir=DIR [--config.x=y ...]`.

Thin by design (flax examples): parses flags, sets up the console (`--verbose` brings back third-party INFO logs),
starts `jax.distributed` when asked, validates the locked config (`d2g_jax.validate`: every rule of every phase the
mode will run, before anything is written) and hands it to `d2g_jax.pipeline.run`.

Multi-host (one process per host, see launch/): `--jax_distributed` lets JAX detect the cluster (SLURM, Cloud
TPU, ...); `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` set it explicitly.
"""

import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (pairs, checkpoints, logs, exports).")
_DIST = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (cluster auto-detection).")
_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies --jax_distributed).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every library's INFO logs (Orbax, grain, clu, TF) and the config.")


def init_distributed() -> None:
    explicit = [_COORD.value, _NPROC.value, _PID.value]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together.")
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    elif _DIST.value:
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())  # fmt: skip


def _config_file(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1].split(":", 1)[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _unknown_field_message(argv) -> str | None:
    """Names the first `--config.a.b=` override whose field does not exist, with the fields that do."""
    import importlib.util

    path = _config_file(argv)
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("_d2g_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config.") :].split("=", 1)[0].split(".")
        node, seen = config, []
        for k in keys:
            if not hasattr(node, "keys") or k not in node.keys():
                where = "config" + "".join("." + x for x in seen)
                have = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"{a}: {where} has no field {k!r} ({path}). Fields of {where}: {', '.join(have)}. "
                        "Check the spelling; new fields must be added to the config file, not the command line.")  # fmt: skip
            node, seen = node[k], seen + [k]
    return None


def parse_flags(argv):
    """absl's parser, with a clear message for an unknown `--config.x.y` field (ml_collections raises a bare
    AttributeError from deep inside flag parsing)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        msg = _unknown_field_message(argv)
        raise SystemExit(f"FATAL config error: {msg or e}") from None
    except flags.Error as e:
        raise SystemExit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.") from None


def host_devices(config) -> None:
    """`config.cpu.host_devices` > 0: the host CPU as that many JAX devices (before any backend starts). A device
    count in XLA_FLAGS (set by hand, e.g. by the tests) wins; a count JAX already holds is left as it is."""
    n = int(config.get("cpu", {}).get("host_devices", 0) or 0)
    if n <= 0:
        return
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        logging.info("config.cpu.host_devices=%d not applied: XLA_FLAGS sets the host device count", n)
        return
    jax.config.update("jax_num_cpu_devices", n)


def compile_cache(config, workdir: str) -> str:
    """`config.jax_cache_dir` (relative: inside the workdir) as JAX's persistent compilation cache; "" = off."""
    d = str(config.get("jax_cache_dir", "") or "")
    if not d:
        return ""
    d = os.path.join(workdir, d) if not os.path.isabs(os.path.expanduser(d)) else os.path.expanduser(d)
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from d2g_jax import console

    console.setup(_VERBOSE.value)
    console.set_command(sys.argv[1:])
    host_devices(_CONFIG.value)
    compile_cache(_CONFIG.value, _WORKDIR.value)
    init_distributed()
    from d2g_jax import pipeline
    from d2g_jax.validate import ConfigError, validate

    try:
        validate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        raise app.UsageError(f"config error: {e}") from None
    if _VERBOSE.value:
        logging.info("config:\n%s", _CONFIG.value)
    run_or_die(lambda: pipeline.run(_CONFIG.value, _WORKDIR.value, config_file=_config_file(sys.argv) or ""))


def run_or_die(fn) -> None:
    """Runs the job; on an error, prints it as the console's last line (the full traceback with --verbose) and exits
    with status 1 at once, so background threads (Orbax's async saves, grain readers) add no shutdown noise after
    the cause."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure ends the same way: the cause, last
        from d2g_jax import console

        if console.verbose():
            logging.error("%s", traceback.format_exc())
        else:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            logging.error("(raised at %s:%d; --verbose for the traceback)", tb.filename, tb.lineno)
        logging.error("FATAL %s: %s", type(e).__name__, e)
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
