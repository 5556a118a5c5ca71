"""A synthetic attribute world for the attribute-classifier tests (not MNIST: the system must not depend on it).

32×32 RGB images of a shape ("square", "ring", "bar") in a colour ("red", "green", "blue") on black, at a random
position and size, captioned "a {colour} {shape} on black"; `micro_classifier()` trains a small classifier on them
once per process (≈ 100 steps) and saves it to a temporary folder.
"""

import functools
import json
import os
import tempfile

import numpy as np

SHAPES = ("square", "ring", "bar")
COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 80, 250)}
ATTRIBUTES = (("shape", SHAPES), ("colour", tuple(COLOURS)))
SIDE = 32


def caption(shape: int, colour: int) -> str:
    return f"a {tuple(COLOURS)[colour]} {SHAPES[shape]} on black"


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images [n, 32, 32, 3], shape labels [n], colour labels [n])."""
    shapes, colours = rng.integers(0, 3, n), rng.integers(0, 3, n)
    yy, xx = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    out = np.zeros((n, SIDE, SIDE, 3), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(11, 21, 2)
        r = rng.uniform(6, 9)
        if shapes[i] == 0:
            m = (np.abs(yy - cy) <= r * 0.8) & (np.abs(xx - cx) <= r * 0.8)
        elif shapes[i] == 1:
            d = np.hypot(yy - cy, xx - cx)
            m = (d <= r) & (d >= r - 2.5)
        else:
            m = (np.abs(yy - cy) <= 2) & (np.abs(xx - cx) <= r)
        out[i][m] = COLOURS[tuple(COLOURS)[colours[i]]]
    return out, shapes, colours


def write_folder(folder: str, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`folder/images/{i:05d}.png` + `folder/captions.jsonl` (the d2g_jax dataset format); returns images, captions."""
    from PIL import Image

    images, shapes, colours = draw(np.random.default_rng(seed), n)
    os.makedirs(os.path.join(folder, "images"))
    caps = [caption(s, c) for s, c in zip(shapes, colours)]
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        for i, (img, cap) in enumerate(zip(images, caps)):
            Image.fromarray(img).save(os.path.join(folder, "images", f"{i:05d}.png"))
            f.write(json.dumps({"caption": cap, "file": f"images/{i:05d}.png"}) + "\n")
    return images, caps


@functools.lru_cache(maxsize=1)
def micro_classifier() -> str:
    """A classifier folder trained on the synthetic world (once per process)."""
    from d2g_jax.eval import attributes as A

    config = A.ClassifierConfig(attributes=ATTRIBUTES, input_size=SIDE, stages=((8,), (16,)), feature_dim=16)
    rng = np.random.default_rng(0)

    def batches(step):
        x, s, c = draw(rng, 32)
        return x, np.stack([s, c], 1)

    params = A.fit(config, batches, steps=120, seed=0, lr=5e-3, warmup=10, log=None)
    folder = tempfile.mkdtemp(prefix="micro_classifier_")
    A.save_classifier(folder, config, params)
    return folder
