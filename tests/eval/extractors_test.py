"""Evaluation extractors (d2g_jax.eval.extractors) vs the upstream reference code paths, on random-weight files written
in the real formats by d2g_jax.eval.random_extractors (real weights cannot be downloaded here).

References: clean-fid's InceptionV3W; GigaGAN's compute_clip_score written out with open_clip's tokenizer and eval
transform + transformers CLIPModel; dreamsim.dreamsim called directly. Tolerances are stated at each assertion.
"""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from d2g_jax.eval import extractors as ex
from d2g_jax.eval import random_extractors as rx

DS_TYPE = "open_clip_vitb32"  # the lightest DreamSim type: one ViT-B/32, no torch.hub (the ensemble test is `slow`)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any download attempt (torch.hub, clean-fid, dreamsim's zip) fails the test loudly."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    return os.path.dirname(rx.write_random_inception(str(tmp_path_factory.mktemp("inception"))))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return rx.write_random_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def dreamsim_dir(tmp_path_factory):
    return rx.write_random_dreamsim(str(tmp_path_factory.mktemp("dreamsim")), DS_TYPE)


# ------------------------------------------------------------------------------------------------------ Inception


def test_inception_matches_cleanfid(inception_dir):
    from cleanfid.inception_torchscript import InceptionV3W

    imgs = np.random.default_rng(0).uniform(0, 255, (2, 299, 299, 3)).astype(np.float32)
    extractor = ex.InceptionExtractor(inception_dir, device="cpu", batch_size=1)  # two batches
    ours = extractor(imgs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation
        ref_model = InceptionV3W(inception_dir, download=False).eval()  # what cleanfid's feature_extractor wraps
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())).numpy()
    assert ours.shape == (2, 2048) and ours.dtype == np.float32
    assert ref.std() > 1e-2 and np.abs(ref[0] - ref[1]).max() > 1e-3  # non-degenerate random features
    # Same TorchScript graph on the same float32 inputs: equal up to batch-size-dependent kernel rounding.
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    file = os.path.join(inception_dir, ex.INCEPTION_FILENAME)
    assert ex.inception_file(file) == ex.inception_file(inception_dir) == extractor.file  # a file or its folder
    assert extractor.identity == f"inception-2015-12-05/{ex.file_fingerprint(file)}"


# ------------------------------------------------------------------------------------------------------------ CLIP


def _gigagan_clip_scores(folder, images, prompts):
    """GigaGAN evaluation.py compute_clip_score, with open_clip's tokenize (= openai clip.tokenize(truncate=True)) and
    open_clip's eval transform; the model is the transformers CLIPModel in `folder`."""
    import open_clip
    import torch.nn.functional as F
    from open_clip.transform import image_transform
    from PIL import Image
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(folder).eval().float()
    preprocess = image_transform(clip.config.vision_config.image_size, is_train=False)  # OpenAI mean/std
    with torch.no_grad():
        imgs = torch.stack([preprocess(Image.fromarray(im)) for im in images], dim=0)
        tokens = open_clip.tokenize(prompts)
        prepend_text_token = open_clip.tokenize("A photo depicts ")[:, 1:4]
        prepend_text_tokens = prepend_text_token.expand(tokens.shape[0], -1)
        start_tokens = tokens[:, :1]
        new_text_tokens = torch.cat([start_tokens, prepend_text_tokens, tokens[:, 1:]], dim=1)[:, :77]
        last_cols = new_text_tokens[:, 77 - 1 : 77]
        last_cols[last_cols > 0] = 49407  # eot token
        new_text_tokens = torch.cat([new_text_tokens[:, :76], last_cols], dim=1)
        img_embs = clip.get_image_features(pixel_values=imgs)
        text_embs = clip.get_text_features(input_ids=new_text_tokens)
        img_embs = getattr(img_embs, "pooler_output", img_embs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        return F.cosine_similarity(img_embs, text_embs, dim=1).numpy(), new_text_tokens.numpy(), img_embs.numpy()


def test_clip_scores_match_gigagan(clip_dir):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    long_prompt = " ".join(["a very long caption with many words"] * 15)  # > 77 tokens: truncation + EOT surgery
    prompts = ["A cat sitting on a mat.", "Two dogs, playing in the SNOW!", long_prompt]
    scorer = ex.ClipScorer(clip_dir, device="cpu", batch_size=2)
    ref, ref_tokens, ref_img = _gigagan_clip_scores(clip_dir, images, prompts)
    np.testing.assert_array_equal(scorer.tokenize(prompts), ref_tokens)  # token ids: exact
    # "A photo depicts" in the real CLIP vocabulary; long prompts end in EOT at column 76.
    assert list(scorer.tokenize(["x"])[0, :6]) == [49406, 320, 1125, 29340, 343, 49407]  # 343 = "x</w>"
    assert scorer.tokenize([long_prompt])[0, 76] == 49407
    ours = scorer.scores(images, prompts)
    assert ours.shape == (3,) and ours.dtype == np.float32
    assert np.ptp(ref) > 1e-2  # the random model separates the pairs
    # Cosines in [-1, 1]; pixels preprocessed by PIL+numpy (ours) vs torchvision (ref) in float32: atol 1e-5.
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    emb = scorer.image_embeds(images)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, ref_img / np.linalg.norm(ref_img, axis=1, keepdims=True), atol=1e-5)
    assert scorer.identity.startswith("clip/")


def test_clip_preprocessing_non_square_matches_open_clip(clip_dir):
    from open_clip.transform import image_transform
    from PIL import Image

    images = np.random.default_rng(2).integers(0, 256, (2, 75, 130, 3), dtype=np.uint8)  # landscape, odd crop offset
    ref = torch.stack([image_transform(32, is_train=False)(Image.fromarray(im)) for im in images]).numpy()
    ours = ex._clip_preprocess(images, 32, ex.OPENAI_CLIP_MEAN, ex.OPENAI_CLIP_STD)
    np.testing.assert_allclose(ours, ref, atol=1e-6)  # same PIL resize/crop; float32 normalisation rounding only
    tall = images.transpose(0, 2, 1, 3).copy()  # portrait
    ref = torch.stack([image_transform(32, is_train=False)(Image.fromarray(im)) for im in tall]).numpy()
    np.testing.assert_allclose(ex._clip_preprocess(tall, 32, ex.OPENAI_CLIP_MEAN, ex.OPENAI_CLIP_STD), ref, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- DreamSim


def _dreamsim_reference(folder, dreamsim_type, a, b):
    from dreamsim import dreamsim
    from PIL import Image

    previous_hub = torch.hub.get_dir()
    model, preprocess = dreamsim(pretrained=True, device="cpu", cache_dir=folder, dreamsim_type=dreamsim_type)
    torch.hub.set_dir(previous_hub)
    with torch.no_grad():
        ta = torch.cat([preprocess(Image.fromarray(x)) for x in a])
        tb = torch.cat([preprocess(Image.fromarray(x)) for x in b])
        return model(ta, tb).numpy(), model.embed(ta).numpy()


def test_dreamsim_matches_package(dreamsim_dir):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    b[1] = rng.integers(0, 256, b[1].shape)  # one near pair, one unrelated pair
    embedder = ex.DreamSimEmbedder(dreamsim_dir, DS_TYPE, device="cpu")
    ours_e, ours_d = embedder.embed(a), embedder.distance(a, b)
    ref_d, ref_e = _dreamsim_reference(dreamsim_dir, DS_TYPE, a, b)
    assert ours_e.shape == (2, 512) and ours_d.shape == (2,)
    assert ref_d[1] > ref_d[0] > 0  # the near pair is nearer
    # Same modules, same inputs (DreamSim's own preprocessing): float32 rounding only.
    np.testing.assert_allclose(ours_d, ref_d, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours_e, ref_e, atol=1e-5)
    assert embedder.identity.startswith(f"dreamsim/{DS_TYPE}/")


@pytest.mark.slow
def test_dreamsim_ensemble_offline(tmp_path):
    """The default "ensemble" (three ViT-B/16, DINO via torch.hub from the folder): ~1 min on 2 CPU cores."""
    folder = rx.write_random_dreamsim(str(tmp_path / "ens"), "ensemble")
    assert os.path.isfile(os.path.join(folder, "facebookresearch_dino_main", "hubconf.py"))
    hub_before = torch.hub.get_dir()
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    ours = ex.DreamSimEmbedder(folder, "ensemble", device="cpu").distance(a, b)
    assert torch.hub.get_dir() == hub_before  # dreamsim's torch.hub.set_dir(folder) is undone
    ref, _ = _dreamsim_reference(folder, "ensemble", a, b)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------- missing files


def test_missing_inception_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ex.InceptionExtractor(str(tmp_path), device="cpu")
    msg = str(err.value)
    assert os.path.join(str(tmp_path), ex.INCEPTION_FILENAME) in msg
    assert ex.INCEPTION_URL in msg and "config.eval.inception" in msg
    with pytest.raises(FileNotFoundError, match="config.eval.inception"):
        ex.InceptionExtractor(str(tmp_path / "nowhere" / "inception-2015-12-05.pt"), device="cpu")
    with pytest.raises(FileNotFoundError, match="config.eval.inception"):
        ex.InceptionExtractor("", device="cpu")


@pytest.mark.parametrize(
    "remove,named",
    [
        (["model.safetensors"], "model.safetensors"),
        (["config.json"], "config.json"),
        (["vocab.json", "tokenizer.json"], "vocab.json"),
    ],
)
def test_missing_clip_files(clip_dir, tmp_path, remove, named):
    folder = str(tmp_path / "clip")
    shutil.copytree(clip_dir, folder)
    for name in remove:
        os.remove(os.path.join(folder, name))
    with pytest.raises(FileNotFoundError) as err:
        ex.ClipScorer(folder, device="cpu")
    msg = str(err.value)
    assert named in msg and folder in msg and "config.eval.clip" in msg
    with pytest.raises(FileNotFoundError, match="config.eval.clip"):
        ex.ClipScorer(str(tmp_path / "absent"), device="cpu")


def test_missing_dreamsim_files(dreamsim_dir, tmp_path):
    from dreamsim.config import dreamsim_weights

    folder = str(tmp_path / "ds")
    shutil.copytree(dreamsim_dir, folder)
    shutil.rmtree(os.path.join(folder, f"{DS_TYPE}_single_lora"))
    with pytest.raises(FileNotFoundError) as err:
        ex.DreamSimEmbedder(folder, DS_TYPE, device="cpu")
    msg = str(err.value)
    assert f"{DS_TYPE}_single_lora" in msg and dreamsim_weights[DS_TYPE] in msg and "config.eval.dreamsim" in msg
    assert f"{DS_TYPE}_pretrain.pth.tar" not in msg  # only what is missing is listed
    # The ensemble on an empty folder: the zip's four entries plus torch.hub's DINO repo and weights.
    with pytest.raises(FileNotFoundError) as err:
        ex.DreamSimEmbedder(str(tmp_path), "ensemble", device="cpu")
    msg = str(err.value)
    for name in (
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
        "ensemble_lora",
        "facebookresearch_dino_main/hubconf.py",
        "checkpoints/dino_vitbase16_pretrain.pth",
        dreamsim_weights["ensemble"],
        "config.eval.dreamsim",
    ):
        assert name in msg, name
    assert not os.path.exists(os.path.join(str(tmp_path), "pretrained.zip"))


def test_import_without_torch():
    """`import d2g_jax.eval.extractors` (and the writers) needs none of torch / transformers / dreamsim / cleanfid."""
    code = (
        "import sys\nfor m in ('torch', 'transformers', 'dreamsim', 'cleanfid', 'open_clip', 'peft'):\n"
        "    sys.modules[m] = None\nimport d2g_jax.eval.extractors, d2g_jax.eval.random_extractors\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
