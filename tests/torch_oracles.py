"""Helpers for building the PyTorch oracles of the tests (shared by tests/losses/ and tests/world/)."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def skip_torch_init():
    """`torch.nn.init` as no-ops while an oracle is built whose every tensor a strict checkpoint load overwrites
    (torchvision's VGG16 spends seconds initialising its 120M-parameter ImageNet classifier)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


@contextlib.contextmanager
def cwd(path):
    """Runs the block in `path` (elatentlpips' `pretrained=True` reads ./ckpt/)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
