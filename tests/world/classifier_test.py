"""The MNIST world's attribute classifier (d2g_jax/world/classifier.py): a micro training run writes a folder the
evaluation loads with the world's vocabulary, trains on the train split only, is deterministic in its seed, and
the augmentation's geometry is what it claims (identity at zero, an exact pixel shift)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2g_jax.eval import attributes as A
from d2g_jax.world import classifier as C
from d2g_jax.world import data as W


@pytest.fixture(scope="module")
def splits():
    return W.world_splits(0)


def test_micro_training_run(splits, tmp_path, monkeypatch):
    seen = []
    recolour = W.recoloured_batch
    monkeypatch.setattr(W, "recoloured_batch", lambda split, rows, rng: seen.append(split.name) or recolour(
        split, rows, rng))  # fmt: skip
    logs = []
    out = str(tmp_path / "clf")
    res = C.train_classifier(out, splits, seed=3, steps=12, batch_size=32, log=logs.append)
    assert seen == ["train"] * 12  # the held-out split is never drawn for training
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "training.json"]
    with open(os.path.join(out, "training.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert res["steps"] == 12 and res["size_bytes"] <= 1.5e6 and res["seconds"] > 0
    for k in ("heldout_digit_acc", "heldout_colour_acc", "heldout_both_acc"):
        assert 0 <= res[k] <= 1
    assert res["heldout_both_acc"] <= min(res["heldout_digit_acc"], res["heldout_colour_acc"])
    assert res["heldout_fingerprint"] == W.split_fingerprint(splits["heldout"])
    assert any("classifier step 12/12" in m for m in logs)

    clf = A.load_classifier(out)  # what config.eval.classifier reads: the world's words, in class order
    assert clf.config.classes == {"digit": W.DIGIT_WORDS, "colour": W.COLOURS} and clf.input_size == W.SIDE
    held = splits["heldout"]
    pred = clf.predict(held.images)
    np.testing.assert_allclose(res["heldout_digit_acc"], np.mean(pred["digit"] == held.digits))
    cap = held.captions[0]
    assert clf.parse(cap) == {"digit": int(held.digits[0]), "colour": int(held.colours[0])}
    assert W.parse_caption(cap) == (clf.parse(cap)["digit"], clf.parse(cap)["colour"])

    again = str(tmp_path / "again")  # deterministic in the seed (the compiled step is reused)
    C.train_classifier(again, splits, seed=3, steps=12, batch_size=32, log=logs.append)
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    with pytest.raises(ValueError, match="batch_size=5000 must be in"):
        C.train_classifier(str(tmp_path / "x"), splits, seed=0, steps=1, batch_size=5000)


def test_augmentation_geometry(splits):
    x = jnp.asarray(splits["train"].images[:4], jnp.float32)
    p = C.augment_params(np.random.default_rng(0), 4)
    ident = {k: np.zeros_like(v) for k, v in p.items()}
    ident.update(scale=np.ones(4, np.float32), sigma=np.full(4, 1e-3, np.float32),
                 gain=np.ones((4, 1, 1, 3), np.float32))  # fmt: skip
    aug = jax.jit(C.augment)
    np.testing.assert_allclose(aug(ident, x), x, atol=1e-3)
    shifted = dict(ident, shift=np.tile(np.float32([[1.0, -2.0]]), (4, 1)))  # 1 px down, 2 px left
    want = np.zeros_like(np.asarray(x))
    want[:, 1:, :-2] = np.asarray(x)[:, :-1, 2:]
    np.testing.assert_allclose(aug(shifted, x), want, atol=1e-3)
    y = np.asarray(aug(p, x))  # the random draws change the images and stay in range
    assert y.min() >= 0 and y.max() <= 255 and np.abs(y - np.asarray(x)).mean() > 1
