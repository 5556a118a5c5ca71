"""The MNIST world's distilled one-step generator, shipped beside its teacher (`d2g_jax/world/assets/mnist/student`):
the export of a configs/mnist_long.py run, so `--config.mode=sample`, the demo and diffusers' one-step recipe work
on it without training.

    python -m d2g_jax.world.student --workdir /tmp/d2g_mnist_long          # ship that run's latest export
    python -m d2g_jax.world.student --check                                # verify the shipped files

The folder is an export exactly as `d2g_jax/export.py` writes it — `unet/` (diffusers `UNet2DConditionModel`:
config.json + diffusion_pytorch_model.safetensors) and `export.json` (the x0-parameterisation's timestep, α_T, σ_T,
and the sha256 of every file, which every reader checks: `verify_export`) — plus `student.json`: the recipe, the
run's report rows (student and teacher on the same 500 held-out captions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from d2g_jax.world.mnist import DEFAULT_DIR

STUDENT_DIR = os.path.join(DEFAULT_DIR, "student")
INFO = "student.json"


class StudentError(RuntimeError):
    """The shipped student is missing or damaged."""


def unet_dir(folder: str = STUDENT_DIR) -> str:
    """The shipped student's `unet/` folder after checking every file against `export.json`'s sha256 digests;
    `StudentError` naming the file and the fix otherwise."""
    from d2g_jax.export import ExportError, verify_export

    unet = os.path.join(folder, "unet")
    if not os.path.isfile(os.path.join(folder, "export.json")):
        raise StudentError(f"{os.path.join(folder, 'export.json')}: missing — no shipped student in {folder}. "
                           "Restore it with `git checkout -- d2g_jax/world/assets/mnist/student`, or ship one from "
                           "a configs/mnist_long.py run: `python -m d2g_jax.world.student --workdir RUN`.")  # fmt: skip
    try:
        status = verify_export(unet)
    except ExportError as e:
        raise StudentError(f"the shipped student is damaged: {e} Restore it with `git checkout -- "
                           "d2g_jax/world/assets/mnist/student`.") from None  # fmt: skip
    if status != "verified":
        raise StudentError(f"{os.path.join(folder, 'export.json')}: records no digests; ship the student again.")
    return unet


def ship(workdir: str, out: str = STUDENT_DIR, recipe: str = "configs/mnist_long.py") -> str:
    """Copies `workdir`'s latest export (verified first) to `out` (replacing a previous student) and writes
    `student.json` from the run's report; returns `out`."""
    from d2g_jax import workdir as wd
    from d2g_jax.export import verify_export

    export_root = os.path.join(workdir, "export")
    found = wd.latest_export(export_root)
    if found is None:
        raise StudentError(f"{export_root}: no export; finish the run first (`python -m d2g_jax.main "
                           f"--config={recipe} --workdir={workdir}`).")  # fmt: skip
    if verify_export(found) != "verified":
        raise StudentError(f"{found}: its export.json records no digests; export it again.")
    report_path = os.path.join(workdir, "report", "report.json")
    if not os.path.isfile(report_path):
        raise StudentError(f"{report_path}: missing; the run's report (its metrics go into {INFO}) is written by "
                           "--config.mode=all with report.enabled.")  # fmt: skip
    with open(report_path) as f:
        report = json.load(f)
    step_dir = os.path.dirname(found)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(step_dir, "unet"), os.path.join(tmp, "unet"))
    shutil.copy2(os.path.join(step_dir, wd.EXPORT_INFO), os.path.join(tmp, wd.EXPORT_INFO))
    info: dict[str, Any] = {"recipe": recipe, "command": f"python -m d2g_jax.main --config={recipe} --workdir=W",
                            "export": os.path.basename(step_dir), "report": report}  # fmt: skip
    with open(os.path.join(tmp, INFO), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    unet_dir(out)  # the copy verifies
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="a finished configs/mnist_long.py run to ship")
    ap.add_argument("--out", default=STUDENT_DIR)
    ap.add_argument("--check", action="store_true", help="verify the shipped student's files")
    a = ap.parse_args()
    if a.check or not a.workdir:
        print(f"{unet_dir(a.out)}: verified")
        return
    print(f"shipped {ship(a.workdir, a.out)}")


if __name__ == "__main__":
    main()
