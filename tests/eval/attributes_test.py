"""The attribute classifier as an evaluation extractor (d2g_jax/eval/attributes.py) and its metrics: prompt parsing,
prompt accuracy on constructed predictions, Fréchet distance against closed forms, teacher distances, the folder
format (round trip and every bad file named), native-resolution reference statistics and image folders.

The classifier is micro-trained on a synthetic shape × colour world (tests/eval/attribute_world.py), not on MNIST:
nothing outside d2g_jax/world may know the MNIST world.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from attribute_world import ATTRIBUTES, SHAPES, draw, micro_classifier, write_folder

from d2g_jax.eval import attributes as A
from d2g_jax.eval import metrics as M
from d2g_jax.eval.reference import ReferenceStatsError, reference_stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNISTISH = (("digit", DIGITS), ("colour", ("red", "green", "blue", "light blue")))


@pytest.fixture(scope="module")
def clf():
    return A.load_classifier(micro_classifier())


# ---------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, want", [
    ("a red seven on a black background", {"digit": 7, "colour": 0}),
    ("A RED Seven!", {"digit": 7, "colour": 0}),
    ("a seven, drawn in red; another red seven", {"digit": 7, "colour": 0}),  # the same class twice is one class
    ("a red seven and a blue one", {"digit": None, "colour": None}),  # two digits ("one"), two colours
    ("sevens in reddish ink", {"digit": None, "colour": None}),  # whole words only
    ("a light blue two", {"digit": 2, "colour": 3}),  # the longer phrase wins, "blue" inside it is not counted
    ("a light blue two next to a blue three", {"digit": None, "colour": None}),
    ("a green  eight", {"digit": 8, "colour": 1}),
    ("", {"digit": None, "colour": None}),
])  # fmt: skip
def test_parse_attributes(text, want):
    assert A.parse_attributes(text, MNISTISH) == want


# ------------------------------------------------------------------------------------------------------ metrics


def test_prompt_accuracy_on_constructed_predictions():
    parsed = [{"digit": 7, "colour": 0}, {"digit": 7, "colour": 0}, {"digit": 3, "colour": 1},
              {"digit": 1, "colour": 2}, {"digit": None, "colour": 2}, {"digit": None, "colour": None}]  # fmt: skip
    predicted = {"digit": np.array([7, 7, 3, 4, 5, 6]), "colour": np.array([0, 1, 1, 2, 2, 0])}
    got = M.prompt_accuracy(parsed, predicted)
    # fully parseable: images 0-3; both right: 0 and 2
    assert got["prompt_acc"] == 0.5 and got["prompt_acc_num"] == 4 and got["prompt_unparseable"] == 2
    assert got["prompt_acc_digit"] == 0.75 and got["prompt_acc_digit_num"] == 4  # 0, 1, 2 right of 0-3
    assert got["prompt_acc_colour"] == 0.8 and got["prompt_acc_colour_num"] == 5  # 0, 2, 3, 4 right of 0-4
    with pytest.raises(ValueError, match="none of the 2 prompts names exactly one class of every attribute"):
        M.prompt_accuracy(parsed[4:], {"digit": np.array([1, 2]), "colour": np.array([1, 2])})
    with pytest.raises(ValueError, match=r"predicted\['colour'\] has shape"):
        M.prompt_accuracy(parsed, {"digit": predicted["digit"], "colour": predicted["colour"][:3]})


def _exact_gaussian(n, mu, sd, rng):
    """n samples whose sample mean is exactly mu and sample covariance exactly diag(sd²)."""
    x = rng.standard_normal((n, len(mu)))
    x -= x.mean(0)
    q, _ = np.linalg.qr(x)  # orthonormal columns, still zero-mean
    return q * np.sqrt(n - 1) * sd + mu


def test_frechet_distance_of_identical_and_shifted_gaussians():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    sd1, sd2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    a = _exact_gaussian(400, mu1, sd1, rng)
    assert abs(M.fid_from_features(a, a)) < 1e-9
    shifted = a - mu1 + mu2  # same covariance: FD = |Δμ|²
    np.testing.assert_allclose(M.fid_from_features(a, shifted), np.sum((mu1 - mu2) ** 2), rtol=1e-9)
    b = _exact_gaussian(300, mu2, sd2, rng)  # diagonal covariances: FD = |Δμ|² + Σ (σ1 − σ2)²
    np.testing.assert_allclose(M.fid_from_features(a, b), np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2),
                               rtol=1e-9)  # fmt: skip


def test_teacher_distances(clf):
    x, _, _ = draw(np.random.default_rng(1), 6)
    f = clf(x)
    assert f.shape == (6, 16) and (f >= 0).all()
    np.testing.assert_allclose(M.cosine_distance(f, clf(x.copy())), 0.0, atol=1e-6)
    np.testing.assert_array_equal(M.pixel_rmse(x, x), 0.0)
    y, _, _ = draw(np.random.default_rng(2), 6)
    assert (M.cosine_distance(f, clf(y)) > 0).any()
    black, white = np.zeros((2, 4, 4, 3), np.uint8), np.full((2, 4, 4, 3), 255, np.uint8)
    np.testing.assert_allclose(M.pixel_rmse(black, white), 1.0)
    grey = black.copy()
    grey[:, :2] = 51  # half the pixels differ by 0.2 → RMS = 0.2 / √2
    np.testing.assert_allclose(M.pixel_rmse(black, grey), 0.2 / np.sqrt(2))


# ---------------------------------------------------------------------------------------------------- the folder


def test_micro_classifier_predicts_and_records(clf):
    x, s, c = draw(np.random.default_rng(3), 120)
    pred = clf.predict(x)
    assert (pred["shape"] == s).mean() > 0.9 and (pred["colour"] == c).mean() > 0.95
    _, probs = clf.run(x[:2])
    fields = clf.attribute_fields(["a red ring on black", "a red ring and a blue bar"], probs)
    assert fields[0]["attributes"] == {"shape": "ring", "colour": "red"}
    assert fields[1]["attributes"] == {"shape": None, "colour": None}
    assert fields[0]["predicted"] == {"shape": SHAPES[pred["shape"][0]], "colour": ("red", "green", "blue")[
        pred["colour"][0]]}  # fmt: skip
    assert set(fields[0]["predicted_prob"]) == {"shape", "colour"}
    with pytest.raises(ValueError, match=r"64×64 images, but the attribute classifier .* takes 32×32"):
        clf(np.zeros((1, 64, 64, 3), np.uint8))


def test_save_load_round_trip(clf, tmp_path):
    folder = str(tmp_path / "copy")
    A.save_classifier(folder, clf.config, clf.params)
    again = A.load_classifier(folder)
    assert again.config == clf.config and again.config.classes == dict(ATTRIBUTES)
    assert again.identity == clf.identity  # content-addressed: the same files, the same cache key
    x, _, _ = draw(np.random.default_rng(4), 5)
    f1, p1 = clf.run(x)
    f2, p2 = again.run(x)
    np.testing.assert_array_equal(f1, f2)
    for a in p1:
        np.testing.assert_array_equal(p1[a], p2[a])
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert list(cfg["attributes"]) == ["shape", "colour"] and cfg["input_size"] == 32
    params = {k: dict(v) for k, v in again.params.items()}
    params["features"]["bias"] = np.asarray(params["features"]["bias"]) + 1.0
    A.save_classifier(folder, clf.config, params)
    assert A.load_classifier(folder).identity != clf.identity


def _broken(tmp_path, name):
    folder = str(tmp_path / name)
    shutil.copytree(micro_classifier(), folder)
    return folder


def test_bad_classifier_folders_are_named(tmp_path):
    with pytest.raises(A.ClassifierError, match="config.eval.classifier is empty"):
        A.load_classifier("")
    with pytest.raises(A.ClassifierError, match="not a folder"):
        A.load_classifier(str(tmp_path / "nowhere"))
    f = _broken(tmp_path, "no_config")
    os.remove(os.path.join(f, "config.json"))
    with pytest.raises(A.ClassifierError, match=re.escape(os.path.join(f, "config.json")) + ": missing"):
        A.load_classifier(f)
    f = _broken(tmp_path, "bad_json")
    with open(os.path.join(f, "config.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(A.ClassifierError, match=re.escape(os.path.join(f, "config.json")) + ": not valid JSON"):
        A.load_classifier(f)
    f = _broken(tmp_path, "no_weights")
    os.remove(os.path.join(f, "model.safetensors"))
    with pytest.raises(A.ClassifierError, match=re.escape(os.path.join(f, "model.safetensors")) + ": missing"):
        A.load_classifier(f)
    f = _broken(tmp_path, "truncated")
    with open(os.path.join(f, "model.safetensors"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(A.ClassifierError, match=re.escape(os.path.join(f, "model.safetensors"))):
        A.load_classifier(f)

    def edit(name, change):
        folder = _broken(tmp_path, name)
        path = os.path.join(folder, "config.json")
        with open(path) as fh:
            cfg = json.load(fh)
        change(cfg)
        with open(path, "w") as fh:
            json.dump(cfg, fh)
        return folder, path

    f, path = edit("wider", lambda c: c.update(feature_dim=17))  # weights no longer fit the architecture
    with pytest.raises(A.ClassifierError, match=re.escape(os.path.join(f, "model.safetensors")) + ".*mis-shaped"):
        A.load_classifier(f)
    f, path = edit("extra_class", lambda c: c["attributes"]["shape"].append("star"))
    with pytest.raises(A.ClassifierError, match="head_shape"):
        A.load_classifier(f)
    f, path = edit("no_attributes", lambda c: c.pop("attributes"))
    with pytest.raises(A.ClassifierError, match=re.escape(path) + r": missing field\(s\) \['attributes'\]"):
        A.load_classifier(f)
    f, path = edit("kind", lambda c: c.update(kind="something_else"))
    with pytest.raises(A.ClassifierError, match=re.escape(path) + ": 'kind'"):
        A.load_classifier(f)
    f, path = edit("bad_name", lambda c: c.update(attributes={"Shape!": ["a", "b"], "colour": ["red", "blue"]}))
    with pytest.raises(A.ClassifierError, match=re.escape(path) + ": attribute name 'Shape!'"):
        A.load_classifier(f)
    f, path = edit("repeat", lambda c: c["attributes"].update(colour=["red", "red", "blue"]))
    with pytest.raises(A.ClassifierError, match=re.escape(path) + ": attribute 'colour' repeats a class word"):
        A.load_classifier(f)
    f, path = edit("size", lambda c: c.update(input_size="32"))
    with pytest.raises(A.ClassifierError, match=re.escape(path) + ": input_size: expected an integer"):
        A.load_classifier(f)


# ------------------------------------------------------------------------------- reference statistics and folders


def test_native_reference_statistics(clf, tmp_path):
    real = str(tmp_path / "real")
    images, _ = write_folder(real, 10, seed=7)
    kw = dict(name="shapes", num=0, eval_res=32, extractor=clf, cache_dir=str(tmp_path / "cache"), keep_feats=10,
              native=True)  # fmt: skip
    ref = reference_stats(real, **kw)
    feats = clf(images)  # the PNGs are lossless: the same pixels
    np.testing.assert_allclose(ref["feats"], feats, rtol=1e-6, atol=1e-6)
    mu, sigma = M.feature_stats(feats)
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-5, atol=1e-7)
    assert ref["meta"]["extractor"] == clf.identity and ref["meta"]["protocol"].startswith("native-uint8-rgb32")
    (cached,) = os.listdir(tmp_path / "cache")
    assert cached.startswith("shapes_nall_res32_")
    from PIL import Image

    odd = str(tmp_path / "odd")
    shutil.copytree(real, odd)
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(os.path.join(odd, "images", "00003.png"))
    with pytest.raises(ReferenceStatsError, match=re.escape(os.path.join(odd, "images", "00003.png")) + ": a 40×32"):
        reference_stats(odd, **{**kw, "cache_dir": str(tmp_path / "cache2")})


def test_image_folder(tmp_path):
    from d2g_jax.eval.evaluate import ImageFolder

    folder = str(tmp_path / "set")
    images, caps = write_folder(folder, 12, seed=8)
    every = ImageFolder(folder, seed=1)  # all of them, in a seeded random order
    order = [int(os.path.basename(p)[:5]) for p in every.files]
    assert sorted(order) == list(range(12)) and order != sorted(order)
    assert every.captions == [caps[i] for i in order]
    np.testing.assert_array_equal(every[3:7], images[order[3:7]])
    sub = ImageFolder(folder, num=5, seed=1)
    assert sub.files == every.files[:5] and sub.captions == every.captions[:5]
    assert ImageFolder(folder, num=5, seed=2).files != sub.files
    with pytest.raises(ValueError, match="images_num=13 but"):
        ImageFolder(folder, num=13)
    with pytest.raises(FileNotFoundError, match="no captions.jsonl or samples.jsonl"):
        ImageFolder(str(tmp_path))
    with open(os.path.join(folder, "captions.jsonl"), "a") as f:
        f.write(json.dumps({"caption": "a red bar on black", "file": "images/missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"captions.jsonl:13: image .*missing.png does not exist"):
        ImageFolder(folder)
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write(json.dumps({"file": "images/00000.png", "label": 3}) + "\n")
    with pytest.raises(ValueError, match="captions.jsonl:1: needs a 'file' and a caption"):
        ImageFolder(folder)


def test_system_modules_do_not_import_the_world():
    """d2g_jax/ outside d2g_jax/world/ must not know the MNIST world: its vocabulary comes from classifier folders."""
    pattern = re.compile(r"^\s*(from\s+d2g_jax\.world|from\s+d2g_jax\s+import\s+.*\bworld\b|import\s+d2g_jax\.world)",
                         re.M)  # fmt: skip
    offenders = []
    for root, _, files in os.walk(os.path.join(ROOT, "d2g_jax")):
        if os.path.relpath(root, os.path.join(ROOT, "d2g_jax")).split(os.sep)[0] == "world":
            continue
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    if pattern.search(f.read()):
                        offenders.append(os.path.join(root, name))
    assert not offenders
