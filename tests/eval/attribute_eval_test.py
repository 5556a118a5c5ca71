"""The attribute-classifier metrics end to end on the tiny config (32×32 images): `--config.mode=eval` on a U-Net
folder without export.json (the tiny teacher's own U-Net as a one-step x0 generator), on a folder of captioned
images (`eval.images`), the teacher distance in the eval mode (student and `eval.teacher` rows), and the sample
mode's samples.jsonl.

Oracles: the numbers the eval mode reports are recomputed from what it saved (the PNGs, samples.jsonl and the
classifier features) with the classifier loaded on its own and the metric functions (themselves checked against
closed forms in attributes_test.py); the teacher's distance to itself is 0; a set of images evaluated against
itself has fd ≈ 0 and precision = recall = 1.

To fit the CPU budget only the first run compiles the tiny SD pipeline; the teacher-distance and sample-mode runs
go through the same eval/sample code with `OneStepSampler.load` returning `FakeSampler` (deterministic synthetic
images; the teacher's image is the student's shifted by two pixels), so they compile no U-Net. The real sampler is
tested against diffusers in tests/interop_test.py.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from attribute_world import draw, micro_classifier, write_folder
from PIL import Image

from d2g_jax import pipeline
from d2g_jax.eval import attributes as A
from d2g_jax.eval import metrics as M
from d2g_jax.workdir import teacher_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red square on black", "a green ring on black", "a blue bar on black", "a red ring on black",
           "a blue square on black", "a green bar on black", "a red bar and a blue ring",  # unparseable
           "a blue ring on black"]  # fmt: skip


def _config():
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


class FakeSampler:
    """The OneStepSampler interface the eval and sample modes use, on synthetic images (no compile)."""

    batch_size, latent_shape = 8, (8, 8, 4)

    def images(self, noise, prompts):
        seeds = [int(abs(z).sum() * 1000) % 2**32 for z in np.asarray(noise)]
        return np.concatenate([draw(np.random.default_rng(sd), 1)[0] for sd in seeds])

    def teacher_images(self, noise, prompts, guidance_scale, num_steps):
        return np.roll(self.images(noise, prompts), 2, axis=2)


@pytest.fixture
def fake_sampler(monkeypatch):
    from d2g_jax.generate import OneStepSampler

    monkeypatch.setattr(OneStepSampler, "load", staticmethod(lambda *a, **k: FakeSampler()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attr_eval")
    wd = str(tmp / "wd")
    c = _config()
    c.mode = "eval"
    teacher = teacher_path(c, wd)  # writes the tiny teacher (32×32 images)
    real = str(tmp / "real")
    write_folder(real, 24, seed=11)
    with open(tmp / "prompts.txt", "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    e = c.eval
    e.classifier = micro_classifier()
    e.prompts = str(tmp / "prompts.txt")
    e.num_images, e.batch_size, e.save_images = 8, 8, 8
    e.real, e.real_name = real, "shapes"
    e.metrics = "fd,fd_pr,prompt_acc"
    e.pr_num, e.pr_k, e.teacher_dist_num = 8, 3, 4
    e.random_extractors = False
    return c, wd, teacher, tmp


@pytest.fixture(scope="module")
def x0_run(setup):
    """The teacher's U-Net as a one-step generator (eval.unet=<teacher>/unet; no export.json)."""
    c, wd, teacher, _ = setup
    c = c.copy_and_resolve_references()
    c.eval.unet = os.path.join(teacher, "unet")
    pipeline.run(c, wd)
    tag = "unet_tiny_teacher_shapes_8"
    with open(os.path.join(wd, "eval", f"{tag}.json")) as f:
        return json.load(f), os.path.join(wd, "eval", f"{tag}_images"), c


def test_eval_mode_reports_the_classifier_metrics(x0_run):
    s, saved, c = x0_run
    m = s["metrics"]
    clf = A.load_classifier(c.eval.classifier)
    assert s["classifier"]["identity"] == clf.identity and s["classifier"]["input"].startswith("native-uint8-rgb32")
    assert s["classifier_reference"]["dataset"] == "shapes" and s["classifier_reference"]["count"] == 24
    images = np.stack([np.asarray(Image.open(os.path.join(saved, f"{i:05d}.png"))) for i in range(8)])
    feats = clf(images)
    with np.load(os.path.join(saved, "classifier_features.npz")) as z:
        np.testing.assert_allclose(z["feats"], feats, rtol=1e-5, atol=1e-6)
    real = np.stack([np.asarray(Image.open(os.path.join(c.eval.real, "images", f"{i:05d}.png"))) for i in range(24)])
    real_feats = clf(real)
    np.testing.assert_allclose(m["fd"], M.fid_from_features(feats, real_feats), rtol=1e-5)
    assert m["fd"] > 0 and m["fd_num_real"] == 24
    p, r = M.precision_recall(real_feats[:8], feats, k=3)
    assert (m["fd_precision"], m["fd_recall"], m["fd_pr_num"]) == (p, r, 8)

    recs = _jsonl(os.path.join(saved, "samples.jsonl"))
    assert [r["prompt"] for r in recs] == PROMPTS and [r["seed"] for r in recs] == [c.eval.seed + i for i in range(8)]
    assert recs[0]["attributes"] == {"shape": "square", "colour": "red"}
    assert recs[6]["attributes"] == {"shape": None, "colour": None}  # two shapes, two colours: unparseable
    pred = clf.predict(images)
    names = clf.names
    for i, r in enumerate(recs):
        assert r["predicted"] == clf.words({a: pred[a][i] for a in names})
    named = [r for r in recs if None not in r["attributes"].values()]
    ok = [all(r["predicted"][a] == r["attributes"][a] for a in names) for r in named]
    assert m["prompt_acc"] == np.mean(ok) and m["prompt_acc_num"] == 7 and m["prompt_unparseable"] == 1
    for a in names:
        assert m[f"prompt_acc_{a}"] == np.mean([r["predicted"][a] == r["attributes"][a] for r in recs
                                                 if r["attributes"][a] is not None])  # fmt: skip


def test_teacher_distance(setup, fake_sampler):
    c, wd, _, _ = setup
    c = c.copy_and_resolve_references()
    c.eval.metrics = "prompt_acc,teacher_dist"
    c.eval.unet = os.path.join(wd, "tiny_teacher", "unet")
    c.eval.save_images = 0
    pipeline.run(c, wd)
    with open(os.path.join(wd, "eval", "unet_tiny_teacher_8.json")) as f:
        m = json.load(f)["metrics"]
    from d2g_jax.generate import noise_for_seeds

    fake, clf = FakeSampler(), A.load_classifier(c.eval.classifier)
    z = noise_for_seeds([c.eval.seed + i for i in range(4)], fake.latent_shape)
    student, teacher = fake.images(z, PROMPTS[:4]), fake.teacher_images(z, PROMPTS[:4], 3.0, 10)
    np.testing.assert_allclose(m["teacher_dist"], M.cosine_distance(clf(student), clf(teacher)).mean(), rtol=1e-6)
    np.testing.assert_allclose(m["teacher_dist_pixel"], M.pixel_rmse(student, teacher).mean(), rtol=1e-9)
    assert m["teacher_dist"] > 0 and m["teacher_dist_num"] == 4

    c.eval.teacher = True  # the teacher rows: its distance to itself is 0
    c.eval.unet = ""
    pipeline.run(c, wd)
    with open(os.path.join(wd, "eval", "teacher_8.json")) as f:
        m = json.load(f)["metrics"]
    assert abs(m["teacher_dist"]) < 1e-6 and m["teacher_dist_pixel"] == 0 and 0 <= m["prompt_acc"] <= 1


def test_image_folder_scored_as_generated(setup, x0_run):
    c, wd, _, _ = setup
    c = c.copy_and_resolve_references()
    c.eval.images = c.eval.real  # the real set scored against itself: the floor of fd, P&R = 1
    c.eval.metrics = "fd,fd_pr,prompt_acc"
    c.eval.pr_num = 24
    captions = {r["file"]: r["caption"] for r in _jsonl(os.path.join(c.eval.real, "captions.jsonl"))}
    c.eval.save_images = 3
    pipeline.run(c, wd)
    with open(os.path.join(wd, "eval", "images_real_shapes_24.json")) as f:
        s = json.load(f)
    m = s["metrics"]
    assert abs(m["fd"]) < 1e-6 * np.trace(np.cov(np.load(os.path.join(wd, "eval", "images_real_shapes_24_images",
                                                                      "classifier_features.npz"))["feats"].T) + 1)
    assert m["fd_precision"] == m["fd_recall"] == 1.0 and m["fd_pr_num"] == 24
    assert m["prompt_acc"] >= 0.9 and m["prompt_acc_num"] == 24 and m["num_images"] == 24
    recs = _jsonl(os.path.join(wd, "eval", "images_real_shapes_24_images", "samples.jsonl"))
    assert len(recs) == 3 and "seed" not in recs[1]
    for r in recs:  # each saved image is its source file, captioned as in the folder
        src = np.asarray(Image.open(r["source_file"]))
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(wd, "eval", "images_real_shapes_24_images",
                                                                         r["file"]))), src)  # fmt: skip
        assert r["prompt"] == captions[os.path.relpath(r["source_file"], c.eval.real)]
    # the cached reference statistics of x0_run were reused (one file per extractor identity)
    assert len(os.listdir(os.path.join(wd, "eval", "reference"))) == 1
    c.eval.metrics = "prompt_acc,teacher_dist"
    with pytest.raises(ValueError, match=r"config.eval.images scores fixed images: drop \['teacher_dist'\]"):
        pipeline.run(c, wd)  # refused by validate() before anything runs


def test_sample_mode_records_attributes(setup, fake_sampler):
    c, wd, teacher, tmp = setup
    c = c.copy_and_resolve_references()
    c.mode = "sample"
    c.sample.unet = os.path.join(teacher, "unet")
    c.sample.prompt = "a red ring on black|a blue bar and a green square"
    c.sample.out_dir = str(tmp / "samples")
    pipeline.run(c, wd)
    recs = _jsonl(os.path.join(c.sample.out_dir, "samples.jsonl"))
    clf = A.load_classifier(c.eval.classifier)
    images = np.stack([np.asarray(Image.open(os.path.join(c.sample.out_dir, r["file"]))) for r in recs])
    t_images = np.stack([np.asarray(Image.open(os.path.join(c.sample.out_dir, r["teacher_file"]))) for r in recs])
    assert recs[0]["attributes"] == {"shape": "ring", "colour": "red"}
    assert recs[1]["attributes"] == {"shape": None, "colour": None}
    for r, p, tp in zip(recs, clf.predict(images)["shape"], clf.predict(t_images)["shape"]):
        assert r["predicted"]["shape"] == clf.config.classes["shape"][p]
        assert r["teacher_predicted"]["shape"] == clf.config.classes["shape"][tp]
        assert set(r["predicted_prob"]) == {"shape", "colour"}
    with open(os.path.join(c.sample.out_dir, "summary.json")) as f:
        assert json.load(f)["classifier"]["identity"] == clf.identity
    c.pairs.resolution = 64
    c.sample.out_dir = str(tmp / "samples64")
    with pytest.raises(ValueError, match=r"reads 32×32 images but the generator makes 64×64"):
        pipeline.run(c, wd)


class KeyedFakeSampler(FakeSampler):
    """FakeSampler with a teacher identity (`teacher_key`, as OneStepSampler.load sets it) and a call counter."""

    calls = 0
    teacher_key = "fake-teacher-a"

    def teacher_images(self, noise, prompts, guidance_scale, num_steps):
        KeyedFakeSampler.calls += 1
        shift = 2 if self.teacher_key.endswith("a") else 5
        return np.roll(self.images(noise, prompts), shift, axis=2)


def test_teacher_images_are_cached_per_teacher(setup, monkeypatch, tmp_path):
    """teacher_dist's teacher ODE images are computed once per (teacher, ODE, prompts, seeds) and reused from
    eval.stats_dir by later evaluations: the same metrics, no teacher call; another teacher gets its own file."""
    from d2g_jax.generate import OneStepSampler

    c, wd, _, _ = setup
    c = c.copy_and_resolve_references()
    c.eval.metrics, c.eval.save_images = "teacher_dist", 0
    c.eval.unet = os.path.join(wd, "tiny_teacher", "unet")
    c.eval.stats_dir = str(tmp_path / "cache")
    sampler = KeyedFakeSampler()
    monkeypatch.setattr(OneStepSampler, "load", staticmethod(lambda *a, **k: sampler))
    result = lambda: json.load(open(os.path.join(wd, "eval", "unet_tiny_teacher_8.json")))["metrics"]

    KeyedFakeSampler.calls = 0
    pipeline.run(c, wd)
    first, calls = result(), KeyedFakeSampler.calls
    cache = os.path.join(c.eval.stats_dir, "teacher_images")
    assert calls >= 1 and len([f for f in os.listdir(cache) if f.startswith("teacher_images_")]) == 2
    pipeline.run(c, wd)
    assert KeyedFakeSampler.calls == calls  # served from the cache
    again = result()
    assert again["teacher_dist"] == first["teacher_dist"] and again["teacher_dist_pixel"] == first["teacher_dist_pixel"]

    sampler.teacher_key = "fake-teacher-b"  # another teacher: recomputed, another distance
    pipeline.run(c, wd)
    assert KeyedFakeSampler.calls > calls
    assert result()["teacher_dist_pixel"] != first["teacher_dist_pixel"]
    assert len([f for f in os.listdir(cache) if f.endswith(".npz")]) == 2


def test_the_teacher_row_writes_the_teacher_image_cache(setup, monkeypatch, tmp_path):
    """The teacher's own row (eval.teacher) generates exactly the images teacher_dist compares with: it writes them to
    the cache, so a later row on the same (prompts, seeds) runs no teacher ODE and gets the same distance as if it
    had; a rerun of the teacher row leaves the file as it is."""
    from d2g_jax.generate import OneStepSampler

    c, wd, _, _ = setup
    c = c.copy_and_resolve_references()
    c.eval.metrics, c.eval.save_images = "teacher_dist", 0
    c.eval.unet = os.path.join(wd, "tiny_teacher", "unet")
    sampler = KeyedFakeSampler()
    sampler.teacher_key = "fake-teacher-a"
    monkeypatch.setattr(OneStepSampler, "load", staticmethod(lambda *a, **k: sampler))
    result = lambda: json.load(open(os.path.join(wd, "eval", "unet_tiny_teacher_8.json")))["metrics"]

    c.eval.stats_dir = str(tmp_path / "fresh")  # no cache: the student row computes the teacher images itself
    KeyedFakeSampler.calls = 0
    pipeline.run(c, wd)
    want, alone = result(), KeyedFakeSampler.calls
    assert alone >= 1

    c.eval.stats_dir = str(tmp_path / "cache")
    teacher = c.copy_and_resolve_references()
    teacher.eval.teacher = True
    KeyedFakeSampler.calls = 0
    pipeline.run(teacher, wd)
    cache = os.path.join(c.eval.stats_dir, "teacher_images")
    files_ = [f for f in os.listdir(cache) if f.endswith(".npz")]
    assert len(files_) == 1
    stamp = os.stat(os.path.join(cache, files_[0])).st_mtime_ns
    KeyedFakeSampler.calls = 0
    pipeline.run(c, wd)
    assert KeyedFakeSampler.calls == 0  # the teacher row's images served teacher_dist
    got = result()
    assert got["teacher_dist"] == want["teacher_dist"] and got["teacher_dist_pixel"] == want["teacher_dist_pixel"]
    pipeline.run(teacher, wd)
    assert os.stat(os.path.join(cache, files_[0])).st_mtime_ns == stamp
