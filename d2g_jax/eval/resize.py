"""Image preprocessing of the FID / Precision & Recall protocol (paper §4 "Evaluation protocols").

The paper follows GigaGAN's evaluation code (github.com/mingukkang/GigaGAN, ``evaluation/evaluation.py``,
``compute_fid``), which feeds every image, real and generated alike, through two resizers:

1. **GigaGAN step** (``custom_image_tranform`` of clean-fid): the uint8 RGB image is wrapped in a PIL image,
   center-cropped to a square on its long edge (BigGAN's ``CenterCropLongEdge``, i.e.
   ``torchvision.transforms.functional.center_crop(img, min(img.size))``) and resized to ``eval_res``×``eval_res``
   (256) with ``PIL.Image.LANCZOS``, uint8 in, uint8 out.
2. **clean-fid step** (``mode="clean"``, ``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))``):
   each channel becomes a float32 PIL ``'F'`` image, is resized to 299×299 with ``BICUBIC`` (PIL's resizers are
   antialiased), clipped to [0, 255] and the channels are stacked into float32 ``[299, 299, 3]``. That array is
   what goes into InceptionV3 (which itself expects values in [0, 255]).

Note: the paper's text says the 512→256 step uses "an antialiasing bicubic resizer"; GigaGAN's code, which the
paper says it follows, uses ``Image.LANCZOS`` for that step. We follow the code. Only the second (256→299) step
is bicubic.

Everything here is plain PIL + numpy, bit-identical to the torchvision/clean-fid reference (see
``tests/eval/resize_test.py``); neither torch nor clean-fid is imported at runtime.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

__all__ = [
    "INCEPTION_SIZE",
    "batch_fid_input",
    "center_crop_long_edge",
    "clean_resize",
    "fid_input",
    "gigagan_resize",
]

#: Input resolution of the FID InceptionV3 network (clean-fid's "clean" resizer target).
INCEPTION_SIZE = 299


def _check_rgb(img: np.ndarray, *, name: str = "img", allow_float: bool = False) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [H, W, 3] (RGB, channels last), got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty [H, W, 3] with H, W > 0, got shape {img.shape}")
    if allow_float:
        if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
            raise ValueError(f"{name} must be uint8 or floating point in [0, 255], got dtype {img.dtype}")
    elif img.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 in [0, 255], got dtype {img.dtype}")
    return img


def center_crop_long_edge(img: np.ndarray) -> np.ndarray:
    """Square center crop on the long edge (BigGAN/GigaGAN ``CenterCropLongEdge``).

    Same offsets as ``torchvision.transforms.functional.center_crop(pil_img, min(pil_img.size))``:
    ``top = int(round((H - s) / 2.0))``, ``left = int(round((W - s) / 2.0))`` with ``s = min(H, W)`` (Python's
    round-half-to-even, so an odd surplus of 1 px crops the extra pixel at the bottom/right).

    Args:
      img: uint8 ``[H, W, 3]``.

    Returns:
      uint8 ``[s, s, 3]`` view of ``img``, ``s = min(H, W)``.
    """
    img = _check_rgb(img)
    h, w = img.shape[:2]
    s = min(h, w)
    top = int(round((h - s) / 2.0))
    left = int(round((w - s) / 2.0))
    return img[top : top + s, left : left + s]


def gigagan_resize(img: np.ndarray, size: int = 256) -> np.ndarray:
    """GigaGAN's ``resize_and_center_crop``: long-edge center crop, then PIL ``LANCZOS`` resize to ``size``².

    Args:
      img: uint8 ``[H, W, 3]``.
      size: output side (GigaGAN's ``--eval_res``, 256 in the paper).

    Returns:
      uint8 ``[size, size, 3]``.
    """
    if size <= 0:
        raise ValueError(f"size must be a positive int, got {size}")
    crop = center_crop_long_edge(img)
    pil = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(pil.resize((size, size), Image.LANCZOS))


def clean_resize(img: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resizer: per-channel float32 PIL ``'F'`` BICUBIC resize, clipped to [0, 255].

    Equivalent to ``cleanfid.resize.make_resizer("PIL", False, "bicubic", (size, size))``.

    Args:
      img: ``[H, W, 3]`` uint8, or float in [0, 255] (cast to float32 first, as clean-fid does).
      size: output side (299 for InceptionV3).

    Returns:
      float32 ``[size, size, 3]`` in [0, 255].
    """
    if size <= 0:
        raise ValueError(f"size must be a positive int, got {size}")
    img = _check_rgb(img, allow_float=True)
    out = np.empty((size, size, 3), dtype=np.float32)
    for c in range(3):
        chan = Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32))  # 2-D float32 -> mode 'F'
        out[:, :, c] = np.asarray(chan.resize((size, size), Image.BICUBIC)).clip(0, 255)
    return out


def fid_input(img: np.ndarray, eval_res: int = 256) -> np.ndarray:
    """Full FID preprocessing of one image: :func:`gigagan_resize` to ``eval_res`` then :func:`clean_resize` to 299.

    Args:
      img: uint8 ``[H, W, 3]``.
      eval_res: GigaGAN's intermediate resolution (256 in the paper); ``0`` skips that step (plain clean-fid, no
        crop).

    Returns:
      float32 ``[299, 299, 3]`` in [0, 255], the InceptionV3 input.
    """
    img = _check_rgb(img)
    if eval_res < 0:
        raise ValueError(f"eval_res must be >= 0 (0 = skip the GigaGAN resize), got {eval_res}")
    if eval_res:
        img = gigagan_resize(img, eval_res)
    return clean_resize(img, INCEPTION_SIZE)


def batch_fid_input(images: np.ndarray, eval_res: int = 256, num_workers: int | None = None) -> np.ndarray:
    """:func:`fid_input` over a batch, optionally on a thread pool (PIL's resize releases the GIL).

    Args:
      images: uint8 ``[N, H, W, 3]``.
      eval_res: as in :func:`fid_input`.
      num_workers: threads; ``None`` → ``min(8, os.cpu_count())``; ``0`` or ``1`` → serial.

    Returns:
      float32 ``[N, 299, 299, 3]`` in [0, 255] (≈1.07 MB per image).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3] (RGB, channels last), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    n = images.shape[0]
    out = np.empty((n, INCEPTION_SIZE, INCEPTION_SIZE, 3), dtype=np.float32)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)

    def work(i: int) -> None:
        out[i] = fid_input(images[i], eval_res)

    if num_workers <= 1 or n <= 1:
        for i in range(n):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            list(pool.map(work, range(n)))
    return out
