"""Entry point: `python -m d2g_jax.main --config=configs/<name>.py --workdir=DIR [--config.x=y ...]`.

Thin by design (flax examples): parses flags, locks the config, and hands it to `d2g_jax.pipeline.run`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (pairs, checkpoints, logs, exports).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from d2g_jax import pipeline

    logging.info("config:\n%s", _CONFIG.value)
    pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
