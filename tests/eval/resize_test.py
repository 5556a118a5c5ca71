"""FID preprocessing (d2g_jax.eval.resize) vs the reference GigaGAN + clean-fid pipeline on real photos.

The reference is built exactly as GigaGAN's ``evaluation.py::compute_fid`` does it: PIL image →
``torchvision.transforms.functional.center_crop(img, min(img.size))`` (BigGAN's CenterCropLongEdge) →
``.resize((256, 256), Image.LANCZOS)`` → clean-fid's "clean" resizer
``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))``. Tolerance: bit-identical (``array_equal``),
since both sides run the same PIL kernels on the same pixels.
"""

import numpy as np
import pytest
import skimage.data
import torchvision.transforms.functional as TF
from cleanfid.resize import build_resizer, make_resizer
from PIL import Image

from d2g_jax.eval import resize

# Shapes (H, W): astronaut 512², chelsea 300×451 (surplus 151 → left = round(75.5) = 76), coffee 400×600,
# rocket 427×640 (surplus 213 → left = round(106.5) = 106, half-to-even), colorwheel 370×371 (surplus 1 → 0),
# hubble 872×1000 (downscale by > 3).
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "colorwheel", "hubble_deep_field"]


def _photo(name: str, transpose: bool = False) -> np.ndarray:
    img = getattr(skimage.data, name)()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
    return np.ascontiguousarray(img.transpose(1, 0, 2)) if transpose else img


def _ref_gigagan(img: np.ndarray, size: int = 256) -> np.ndarray:
    pil = Image.fromarray(img)
    pil = TF.center_crop(pil, min(pil.size))
    pil = pil.resize((size, size), Image.LANCZOS)
    return np.array(pil)


_REF_CLEAN = make_resizer("PIL", False, "bicubic", (299, 299))


def _ref_fid_input(img: np.ndarray, eval_res: int = 256) -> np.ndarray:
    return _REF_CLEAN(_ref_gigagan(img, eval_res) if eval_res else img)


@pytest.mark.parametrize("transpose", [False, True], ids=["landscape", "portrait"])
@pytest.mark.parametrize("name", PHOTOS)
def test_fid_input_matches_gigagan_cleanfid_reference(name, transpose):
    img = _photo(name, transpose)
    ref = _ref_fid_input(img)
    out = resize.fid_input(img)
    assert out.dtype == np.float32 and out.shape == (299, 299, 3)
    assert ref.dtype == np.float32 and ref.shape == (299, 299, 3)
    np.testing.assert_array_equal(out, ref)
    assert out.min() >= 0.0 and out.max() <= 255.0


@pytest.mark.parametrize("transpose", [False, True], ids=["landscape", "portrait"])
@pytest.mark.parametrize("name", PHOTOS)
def test_center_crop_and_gigagan_resize_match_torchvision(name, transpose):
    img = _photo(name, transpose)
    pil = Image.fromarray(img)
    ref_crop = np.array(TF.center_crop(pil, min(pil.size)))
    crop = resize.center_crop_long_edge(img)
    np.testing.assert_array_equal(crop, ref_crop)
    out = resize.gigagan_resize(img, 256)
    assert out.dtype == np.uint8 and out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out, _ref_gigagan(img, 256))


ODD_SHAPES = [(300, 301), (301, 300), (300, 302), (300, 303), (303, 300), (300, 305), (64, 97), (97, 64), (5, 5)]


@pytest.mark.parametrize("hw", ODD_SHAPES)
def test_center_crop_offsets_round_half_to_even(hw):
    """Odd surpluses: torchvision uses Python round() (half to even): surplus 1 → 0, 3 → 2, 5 → 2, 33 → 16."""
    h, w = hw
    img = np.random.default_rng(h * 1000 + w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(resize.center_crop_long_edge(img), np.array(TF.center_crop(pil, min(pil.size))))


def test_center_crop_known_offsets():
    # 1×6 row with pixel value = column index: s = 1, left = round(2.5) = 2.
    img = np.repeat(np.arange(6, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert resize.center_crop_long_edge(img)[0, 0, 0] == 2
    # 7 columns: left = round(3.0) = 3; 4 rows × 7 columns: s = 4, left = round(1.5) = 2.
    assert resize.center_crop_long_edge(np.repeat(np.arange(7, dtype=np.uint8)[None, :, None], 3, axis=2))[0, 0, 0] == 3
    wide = np.broadcast_to(np.arange(7, dtype=np.uint8)[None, :, None], (4, 7, 3))
    np.testing.assert_array_equal(resize.center_crop_long_edge(wide)[0, :, 0], [2, 3, 4, 5])


def test_small_image_is_upsampled_like_reference():
    img = _photo("chelsea")[100:180, 50:170]  # 80×120: LANCZOS upsampling to 256
    np.testing.assert_array_equal(resize.fid_input(img), _ref_fid_input(img))


def test_eval_res_zero_is_plain_cleanfid():
    img = _photo("coffee")  # no crop, straight to 299×299 (stretch), as clean-fid's mode="clean"
    np.testing.assert_array_equal(resize.fid_input(img, eval_res=0), build_resizer("clean")(img))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clean_resize_float_input(dtype):
    img = _ref_gigagan(_photo("rocket")).astype(dtype) * 0.9 + 3.3
    np.testing.assert_array_equal(resize.clean_resize(img), _REF_CLEAN(img))
    np.testing.assert_array_equal(resize.clean_resize(img, 128), make_resizer("PIL", False, "bicubic", (128, 128))(img))


def test_clean_resize_clips_overshoot():
    # Bicubic overshoots at hard 0/255 edges; clean-fid clips to [0, 255] after resizing.
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    out = resize.clean_resize(img)
    assert out.min() == 0.0 and out.max() == 255.0
    np.testing.assert_array_equal(out, _REF_CLEAN(img))


@pytest.mark.parametrize("num_workers", [1, 3])
def test_batch_fid_input(num_workers):
    imgs = np.stack([resize.gigagan_resize(_photo(n), 320) for n in ["astronaut", "chelsea", "rocket", "coffee"]])
    imgs[1] = imgs[1, :, ::-1]
    out = resize.batch_fid_input(imgs, num_workers=num_workers)
    assert out.shape == (4, 299, 299, 3) and out.dtype == np.float32
    for i in range(4):
        np.testing.assert_array_equal(out[i], _ref_fid_input(imgs[i]))


def test_bad_inputs_raise_clear_errors():
    img = _photo("chelsea")
    with pytest.raises(ValueError, match="uint8"):
        resize.fid_input(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        resize.fid_input(img[..., 0])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        resize.gigagan_resize(np.concatenate([img, img[..., :1]], axis=-1))
    with pytest.raises(ValueError, match="uint8 or floating"):
        resize.clean_resize(img.astype(np.int32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        resize.batch_fid_input(img)
    with pytest.raises(ValueError, match="uint8"):
        resize.batch_fid_input(img[None].astype(np.float64))
