"""Real-image reference statistics for FID and Precision & Recall, computed once and cached.

`reference_stats(source, name=..., num=..., eval_res=..., extractor=..., cache_dir=..., keep_feats=...)` reads the
real images (a folder searched recursively for .jpg/.jpeg/.png in sorted path order, or
`tfds:NAME[/CONFIG][:VERSION]:SPLIT[:FEATURE]`), applies the evaluation protocol of `d2g_jax.eval.resize`
(GigaGAN: center crop + LANCZOS to `eval_res`; clean-fid: bicubic to 299), extracts Inception features and returns
`{"mu", "sigma", "feats", "meta"}`; `feats` keeps the first `keep_feats` feature rows (Precision & Recall).

With `native=True` (the attribute classifier, `d2g_jax.eval.attributes`) the images are not resized: each must
already be `eval_res`×`eval_res` (a file of another size is named), and the extractor gets uint8 [B, H, W, 3].

The cache file is `<cache_dir>/<name>_n<num>_res<eval_res>_<extractor id>.npz`; its `meta` (dataset name, image
count, resolution, protocol, extractor identity) is checked on every load, so statistics of another dataset,
size, resolution or feature extractor are never mixed in: a mismatch raises `ReferenceStatsError` naming the
fields. The source path is recorded but not compared (a moved dataset folder still matches).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from absl import logging

from d2g_jax.eval import resize

PROTOCOL = "gigagan-centercrop-lanczos{res}+cleanfid-bicubic299"
NATIVE_PROTOCOL = "native-uint8-rgb{res}: no crop or resize"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class ReferenceStatsError(ValueError):
    """Cached statistics that do not match the request, or an unusable real-image source."""


def image_files(folder: str) -> list[str]:
    """Every .jpg/.jpeg/.png under `folder` (recursive), sorted by path."""
    if not os.path.isdir(folder):
        raise ReferenceStatsError(f"config.eval.real={folder}: not a folder. Point it at the real images (e.g. "
                                  "COCO's val2014/ with its 40,504 JPEGs) or use "
                                  "tfds:NAME:SPLIT[:FEATURE].")  # fmt: skip
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    if not out:
        raise ReferenceStatsError(f"config.eval.real={folder}: no .jpg/.jpeg/.png files found (searched recursively).")
    return sorted(out)


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:  # as clean-fid: np.array(Image.open(path).convert("RGB"))
        return np.array(im.convert("RGB"))


def _tfds_images(spec: str, limit: int) -> Iterator[np.ndarray]:
    parts = spec[len("tfds:") :].split(":")
    if len(parts) < 2:
        raise ReferenceStatsError(f"config.eval.real={spec}: expected tfds:NAME[/CONFIG][:VERSION]:SPLIT[:FEATURE].")
    if len(parts) == 2:
        name, split, feature = parts[0], parts[1], "image"
    elif len(parts) == 3:
        name, split, feature = parts
    else:
        name, split, feature = f"{parts[0]}:{parts[1]}", parts[2], parts[3]
    import tensorflow_datasets as tfds

    try:
        ds = tfds.data_source(name, split=split, download=False)
    except Exception as e:  # noqa: BLE001 — name the dataset and the fix
        raise ReferenceStatsError(f"config.eval.real={spec}: cannot open TFDS {name!r} split {split!r} locally "
                                  f"({e}). Prepare it with tfds build (data_dir via "
                                  "TFDS_DATA_DIR).") from e  # fmt: skip
    n = len(ds) if not limit else min(limit, len(ds))
    for i in range(n):
        ex = ds[i]
        if feature not in ex:
            raise ReferenceStatsError(f"config.eval.real={spec}: no feature {feature!r} (has {sorted(ex)}).")
        img = np.asarray(ex[feature])
        yield np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def _fid_inputs(source: str, num: int, eval_res: int, batch: int) -> Iterator[np.ndarray]:
    """float32 [b, 299, 299, 3] batches of protocol-resized real images (threads: PIL releases the GIL)."""
    if source.startswith("tfds:"):
        buf = []
        for img in _tfds_images(source, num):
            buf.append(resize.fid_input(img, eval_res))
            if len(buf) == batch:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)
        return
    files = image_files(source)
    if num:
        if num > len(files):
            raise ReferenceStatsError(f"config.eval.num_real={num} but {source} holds {len(files)} images.")
        files = files[:num]
    work = lambda p: resize.fid_input(_read_rgb(p), eval_res)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), batch):
            yield np.stack(list(pool.map(work, files[start : start + batch])))


def _native_inputs(source: str, num: int, size: int, batch: int) -> Iterator[np.ndarray]:
    """uint8 [b, size, size, 3] batches of real images at their own resolution (no crop or resize)."""

    def check(img: np.ndarray, where: str) -> np.ndarray:
        if img.shape != (size, size, 3):
            raise ReferenceStatsError(f"{where}: a {img.shape[0]}×{img.shape[1]} image, but the extractor reads "
                                      f"{size}×{size} images at their native resolution (no resize); config.eval.real "
                                      "must hold images of the generator's size.")  # fmt: skip
        return img

    if source.startswith("tfds:"):
        buf = []
        for i, img in enumerate(_tfds_images(source, num)):
            buf.append(check(np.asarray(img, np.uint8), f"config.eval.real={source} example {i}"))
            if len(buf) == batch:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)
        return
    files = image_files(source)
    if num:
        if num > len(files):
            raise ReferenceStatsError(f"config.eval.num_real={num} but {source} holds {len(files)} images.")
        files = files[:num]
    for start in range(0, len(files), batch):
        yield np.stack([check(_read_rgb(p), p) for p in files[start : start + batch]])


def cache_path(cache_dir: str, name: str, num: int, eval_res: int, extractor_identity: str) -> str:
    ext = hashlib.sha256(extractor_identity.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{name}_n{num or 'all'}_res{eval_res}_{ext}.npz")


def reference_stats(
    source: str,
    *,
    name: str,
    num: int,
    eval_res: int,
    extractor: Any,
    cache_dir: str,
    keep_feats: int = 0,
    batch: int = 64,
    write: bool = True,
    native: bool = False,
) -> dict[str, Any]:
    """Statistics of the real images (see the module docstring); computed once per cache key. `native`: no resize,
    the extractor reads uint8 images of side `eval_res` (its `protocol` attribute names it in the metadata)."""
    from d2g_jax.eval import metrics

    if not name:
        raise ReferenceStatsError("config.eval.real_name is empty: name the real-image set (e.g. coco2014_val) so "
                                  "its cached statistics can be told apart.")  # fmt: skip
    protocol = getattr(extractor, "protocol", NATIVE_PROTOCOL.format(res=eval_res)) if native else PROTOCOL.format(
        res=eval_res)  # fmt: skip
    meta = {"dataset": name, "num": int(num), "resolution": int(eval_res), "protocol": protocol,
            "extractor": extractor.identity}  # fmt: skip
    path = cache_path(cache_dir, name, num, eval_res, extractor.identity)
    if os.path.isfile(path):
        with np.load(path) as z:
            cached = json.loads(str(z["meta"]))
            diff = sorted(k for k in meta if cached.get(k) != meta[k])
            if diff:
                raise ReferenceStatsError(f"{path}: cached statistics differ in {diff} "
                                          f"({ {k: (cached.get(k), meta[k]) for k in diff} }); delete the file or use "
                                          "another config.eval.stats_dir.")  # fmt: skip
            if keep_feats <= z["feats"].shape[0]:
                logging.info("eval: reference statistics from %s", path)
                return {"mu": z["mu"], "sigma": z["sigma"], "feats": z["feats"][:keep_feats], "meta": cached}
            logging.info("eval: %s keeps %d feature rows, %d needed: recomputing", path, z["feats"].shape[0],
                         keep_feats)  # fmt: skip
    feats = []
    inputs = _native_inputs(source, num, eval_res, batch) if native else _fid_inputs(source, num, eval_res, batch)
    for x in inputs:
        feats.append(extractor(x))
        if len(feats) % 50 == 0:
            logging.info("eval: reference features %d", sum(len(f) for f in feats))
    feats = np.concatenate(feats).astype(np.float32)
    mu, sigma = metrics.feature_stats(feats)
    meta.update(source=os.path.abspath(source) if not source.startswith("tfds:") else source, count=len(feats))
    if write:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma, feats=feats[:keep_feats], meta=json.dumps(meta))
        os.replace(tmp, path)
        logging.info("eval: %d reference images → %s", len(feats), path)
    return {"mu": mu, "sigma": sigma, "feats": feats[:keep_feats], "meta": meta}
