"""What a person sees on the console: d2g_jax's own lines, short; third-party INFO quiet unless asked for.

`setup(verbose)` (called by `main` before anything heavy is imported):
* quiet (default): log records below WARNING are shown only when they come from d2g_jax's own files, with a short
  `HH:MM:SS message` format; TensorFlow/XLA C++ log lines (`TF_CPP_MIN_LOG_LEVEL=3`: their errors reach Python as
  exceptions) and Orbax's Python warnings are hidden. Python warnings and errors from anywhere are always shown.
* verbose (`--verbose`): everything, in absl's full format.

`Progress` prints one line per interval for a phase: step, rate, ETA and the headline metrics.
"""

from __future__ import annotations

import logging as pylogging
import os
import time
import warnings
from collections.abc import Mapping

from absl import logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_state: dict = {"verbose": True, "argv": None}


class _OwnInfoOnly(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return os.path.abspath(record.pathname).startswith(PACKAGE_DIR)


class _ShortFormatter(pylogging.Formatter):
    def format(self, record: pylogging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno < pylogging.WARNING else f"{record.levelname}: "
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{msg}"


def setup(verbose: bool = False) -> None:
    """Quiet (default) or verbose console; safe to call more than once."""
    _state["verbose"] = bool(verbose)
    handler = logging.get_absl_handler()
    for f in list(handler.filters):
        if isinstance(f, _OwnInfoOnly):
            handler.removeFilter(f)
    if verbose:
        handler.setFormatter(logging.PythonFormatter())
        return
    # TF/XLA C++ logs below FATAL (oneDNN notices, "very slow compile" alarms, …): errors reach Python as exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.set_verbosity(logging.INFO)
    handler.addFilter(_OwnInfoOnly())
    handler.setFormatter(_ShortFormatter())
    warnings.filterwarnings("ignore", module=r"orbax(\.|$)")
    warnings.filterwarnings("ignore", message=r".*[Ss]harding info not provided.*")


def verbose() -> bool:
    return _state["verbose"]


def set_command(argv: list[str]) -> None:
    """Remembers the `d2g_jax.main` flags of this process (for messages that say what to run next)."""
    _state["argv"] = list(argv)


def command(extra: str = "") -> str:
    """This job's command line with `extra` flags: flags that `extra` sets replace the same ones."""
    argv = _state["argv"]
    if argv is None:
        return f"python -m d2g_jax.main <the same flags> {extra}".rstrip()
    names = {e.split("=", 1)[0] for e in extra.split()}
    kept = [a for a in argv if a.split("=", 1)[0] not in names]
    return " ".join(["python -m d2g_jax.main", *kept, *extra.split()])


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_metrics(metrics: Mapping[str, float], keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        if k in metrics:
            v = float(metrics[k])
            parts.append(f"{k} {v:.4g}")
    return " · ".join(parts)


class Progress:
    """One console line per `every_s` seconds (and at the end): `phase step/total (p%) · rate · ETA · metrics`.

    The rate and ETA are measured from the first update on, so the first step's compile does not distort them."""

    def __init__(self, phase: str, total: int, start: int = 0, every_s: float = 30.0, unit: str = "steps"):
        self.phase, self.total, self.start, self.every_s, self.unit = phase, int(total), int(start), every_s, unit
        self.t0 = self.t_last = time.perf_counter()
        self.first: tuple[int, float] | None = None  # (done, time) at the first update

    def __call__(self, done: int, metrics: Mapping[str, float] | None = None, keys: tuple[str, ...] = (),
                 force: bool = False) -> bool:  # fmt: skip
        """Prints the line when `every_s` passed since the last one (or `force`, or at the total); returns whether
        it printed."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
            self.t_last = now
            if not (force or done >= self.total):
                return False
        if not (force or done >= self.total or now - self.t_last >= self.every_s):
            return False
        self.t_last = now
        d0, t0 = self.first
        rate = (done - d0) / (now - t0) if done > d0 and now > t0 else 0.0
        pct = 100.0 * done / max(self.total, 1)
        line = f"{self.phase} {done}/{self.total} ({pct:.0f}%)"
        if rate > 0:
            line += f" · {rate:.2f} {self.unit}/s"
        if done < self.total and rate > 0:
            line += f" · ETA {fmt_seconds((self.total - done) / rate)}"
        elif done >= self.total:
            line += f" · {fmt_seconds(now - self.t0)}"
        extra = fmt_metrics(metrics or {}, keys)
        logging.info("%s%s", line, f" · {extra}" if extra else "")
        return True
