"""`--config.mode=eval` end to end on the tiny config: a tiny exported generator, random-weight extractors written in
their real formats (clean-fid's TorchScript Inception, a transformers CLIP folder, a DreamSim checkpoint folder),
real photos from scikit-image and COCO-format captions.

Oracle: the FID the eval mode reports equals clean-fid's own `compute_fid` on the same real folder and the
generated images it saved, with GigaGAN's `custom_image_tranform` (center crop + LANCZOS to 256) and the same
Inception file loaded by clean-fid's `InceptionV3W` (tolerance: 1e-4 relative; both are float32 features then
float64 statistics). Reference statistics are cached once and refused when their key fields differ.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from d2g_jax import pipeline
from d2g_jax.eval.reference import ReferenceStatsError, cache_path
from d2g_jax.workdir import teacher_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTIONS = ["a cat on a sofa", "a red car", "a bowl of fruit", "a rocket launch", "a man in a suit",
            "coffee on a table", "a city street", "a dog on grass", "stars at night", "a green field"]  # fmt: skip


def _config():
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _real_images(folder):
    """12 real photos of several sizes and aspect ratios (the long-edge crop matters), saved as JPEG."""
    os.makedirs(folder)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    k = 0
    for p in photos:
        for v in (p, p[::-1], p[:, ::-1, :]):
            Image.fromarray(np.ascontiguousarray(v)).save(os.path.join(folder, f"img_{k:03d}.jpg"), quality=92)
            k += 1
    return folder


def _coco_json(path):
    images = [{"id": 100 + i, "file_name": f"{i}.jpg"} for i in range(len(CAPTIONS))]
    anns = [{"image_id": 100 + i, "id": j, "caption": c + suffix} for i, c in enumerate(CAPTIONS)
            for j, suffix in enumerate(("", " in the sun"))]  # fmt: skip
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from interop_test import _export  # tests/ is on sys.path (rootdir conftest)

    tmp = tmp_path_factory.mktemp("eval")
    wd = str(tmp / "wd")
    c = _config()
    c.mode = "eval"
    teacher = teacher_path(c, wd)  # writes the tiny teacher
    e = c.eval
    e.unet = _export(teacher, str(tmp / "export"), seed=3)
    e.prompts = _coco_json(str(tmp / "captions_val.json"))
    e.real = _real_images(str(tmp / "real"))
    e.real_name = "skimage_photos"
    e.num_images = 8
    e.metrics = "fid,pr,clip,dreamsim,dreamdiv"
    e.pr_num, e.pr_k = 8, 3
    e.dreamsim_num = 4
    e.dreamdiv_prompts, e.dreamdiv_per_prompt = 2, 3
    e.random_extractors = True
    e.dreamsim_type = "open_clip_vitb32"
    e.batch_size = 8
    e.save_images = 8
    pipeline.run(c, wd)
    return c, wd


def _summary(wd):
    path = os.path.join(wd, "eval", "step_00000007_skimage_photos_8.json")
    with open(path) as f:
        return json.load(f), path


def test_eval_mode_writes_every_metric(run):
    _, wd = run
    s, _ = _summary(wd)
    m = s["metrics"]
    for k in ("fid", "precision", "recall", "clip_score", "dreamsim", "dreamdiv"):
        assert np.isfinite(m[k]), (k, m)
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert -1 <= m["clip_score"] <= 1 and m["dreamsim"] > 0 and m["dreamdiv"] > 0
    assert m["fid_num_real"] == 12 and m["pr_num"] == 8 and m["dreamsim_num"] == 4 and m["dreamdiv_prompts"] == 2
    assert s["reference"]["dataset"] == "skimage_photos" and s["random_extractors"] is True
    assert os.path.isdir(os.path.join(wd, "eval", "tb"))
    assert len([f for f in os.listdir(os.path.join(wd, "eval", "step_00000007_skimage_photos_8_images"))
                if f.endswith(".png")]) == 8  # fmt: skip


def test_fid_chain_equals_clean_fid_on_the_same_images(run):
    """clean-fid's own feature pipeline (folder reading, GigaGAN's transform, clean resize, InceptionV3W) on the real
    folder and on the generated images the eval saved gives our features, our cached reference statistics and,
    through the Fréchet distance (checked against clean-fid's in metrics_test.py), our FID. (With 8 images in
    2048 dimensions clean-fid's own `compute_fid` raises on the singular covariance product, so the chain is
    compared link by link.)"""
    from cleanfid import fid as cfid
    from cleanfid.inception_torchscript import InceptionV3W

    from d2g_jax.eval import metrics
    from d2g_jax.eval.resize import center_crop_long_edge

    c, wd = run
    s, _ = _summary(wd)
    inception = InceptionV3W(os.path.join(wd, "eval", "random_extractors", "inception"), download=False).eval()

    def gigagan(img):  # GigaGAN evaluation.py's resize_and_center_crop (LANCZOS to 256)
        return np.array(Image.fromarray(center_crop_long_edge(img)).resize((256, 256), Image.LANCZOS))

    kw = dict(model=inception, mode="clean", custom_image_tranform=gigagan, num_workers=0, batch_size=8,
              device=torch.device("cpu"), verbose=False)  # fmt: skip
    fake_dir = os.path.join(wd, "eval", "step_00000007_skimage_photos_8_images")
    fake = cfid.get_folder_features(fake_dir, **kw)
    real = cfid.get_folder_features(c.eval.real, **kw)
    with np.load(os.path.join(fake_dir, "inception_features.npz")) as z:
        np.testing.assert_allclose(z["feats"], fake, rtol=1e-4, atol=1e-4 * np.abs(fake).max())
    (cached,) = os.listdir(os.path.join(wd, "eval", "reference"))
    with np.load(os.path.join(wd, "eval", "reference", cached)) as z:
        mu, sigma = metrics.feature_stats(real)
        np.testing.assert_allclose(z["mu"], mu, rtol=1e-4, atol=1e-4 * np.abs(mu).max())
        np.testing.assert_allclose(z["sigma"], sigma, rtol=1e-4, atol=1e-4 * np.abs(sigma).max())
    with pytest.warns(UserWarning, match="rank-deficient"):
        ref = metrics.fid_from_features(fake, real)
    np.testing.assert_allclose(s["metrics"]["fid"], ref, rtol=1e-4)


def test_reference_stats_are_cached_and_checked(run):
    from d2g_jax.eval.extractors import InceptionExtractor
    from d2g_jax.eval.reference import reference_stats

    c, wd = run
    s, _ = _summary(wd)
    cache_dir = os.path.join(wd, "eval", "reference")
    (cached,) = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir)]
    assert cached == cache_path(cache_dir, "skimage_photos", 0, 256, s["reference"]["extractor"])
    mtime = os.path.getmtime(cached)
    ext = InceptionExtractor(os.path.join(wd, "eval", "random_extractors", "inception"))
    kw = dict(name="skimage_photos", num=0, eval_res=256, extractor=ext, cache_dir=cache_dir, keep_feats=8)
    with np.load(cached) as z:
        mu = z["mu"]
    again = reference_stats("/nonexistent/folder", **kw)  # served from the cache: the images are not read again
    np.testing.assert_array_equal(again["mu"], mu)
    assert again["feats"].shape == (8, 2048) and os.path.getmtime(cached) == mtime

    with np.load(cached) as z:  # a file whose recorded key fields differ (e.g. copied from another set) is refused
        data = dict(z)
    meta = json.loads(str(data["meta"]))
    meta["resolution"] = 512
    data["meta"] = json.dumps(meta)
    np.savez(cached, **data)
    with pytest.raises(ReferenceStatsError, match="resolution"):
        reference_stats(c.eval.real, **kw)


def test_missing_extractor_file_is_named(run, tmp_path):
    c, wd = run
    c.eval.random_extractors = False
    c.eval.metrics = "clip"
    c.eval.clip = str(tmp_path / "no_clip_here")
    with pytest.raises(FileNotFoundError, match="config.eval.clip"):
        pipeline.run(c, wd)
    c.eval.metrics = "fid"
    c.eval.inception = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        pipeline.run(c, wd)
    assert jax.process_count() == 1


def test_eval_captions_from_coco_json_and_prompt_files(tmp_path):
    from d2g_jax.eval.evaluate import eval_prompts

    c = _config()
    c.teacher.tiny = False
    c.eval.prompts = _coco_json(str(tmp_path / "captions_val.json"))
    got = eval_prompts(c, 10)  # every image once (10 of 10), one of its two captions each, seeded
    assert sorted(p.replace(" in the sun", "") for p in got) == sorted(CAPTIONS)
    assert got == eval_prompts(c, 10) and len(set(eval_prompts(c, 4))) == 4
    c.eval.seed += 1
    assert eval_prompts(c, 10) != got
    with pytest.raises(ValueError, match="captions for 10 images"):
        eval_prompts(c, 11)
    lines = tmp_path / "prompts.json"  # one JSON object per line under a .json name: read as JSONL, not COCO
    lines.write_text("".join(json.dumps({"caption": p}) + "\n" for p in CAPTIONS))
    c.eval.prompts = str(lines)
    sub = eval_prompts(c, 3)
    assert len(sub) == 3 and sub == sorted(sub, key=CAPTIONS.index)  # a seeded subset, in file order
