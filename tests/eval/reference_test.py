"""Real images from TFDS go through the same protocol as a folder of the same images, and bad real-image sources
are named (the TFDS dataset is mocked with `tfds.testing.mock_data`, serving scikit-image photos)."""

import os

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from d2g_jax.eval import reference
from d2g_jax.eval.reference import ReferenceStatsError

PHOTOS = (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())


def _source(self, split, *args, **kwargs):
    return [{"image": p, "caption": "x"} for p in PHOTOS]


def test_tfds_images_equal_the_folder_route(tmp_path):
    for i, p in enumerate(PHOTOS):
        Image.fromarray(p).save(tmp_path / f"{i}.png")  # lossless: the same pixels as the TFDS examples
    folder = np.concatenate(list(reference._fid_inputs(str(tmp_path), 0, 256, 2)))
    with tfds.testing.mock_data(as_data_source_fn=_source):
        from_tfds = np.concatenate(list(reference._fid_inputs("tfds:coco_captions:val:image", 0, 256, 2)))
        limited = np.concatenate(list(reference._fid_inputs("tfds:coco_captions:val", 2, 256, 2)))
        with pytest.raises(ReferenceStatsError, match="no feature 'picture'"):
            list(reference._fid_inputs("tfds:coco_captions:val:picture", 0, 256, 2))
    assert folder.shape == (3, 299, 299, 3)
    np.testing.assert_array_equal(from_tfds, folder)
    np.testing.assert_array_equal(limited, folder[:2])


def test_bad_real_sources_are_named(tmp_path):
    with pytest.raises(ReferenceStatsError, match="not a folder"):
        list(reference._fid_inputs(str(tmp_path / "missing"), 0, 256, 2))
    with pytest.raises(ReferenceStatsError, match="no .jpg/.jpeg/.png"):
        list(reference._fid_inputs(str(tmp_path), 0, 256, 2))
    with pytest.raises(ReferenceStatsError, match="tfds:NAME"):
        list(reference._fid_inputs("tfds:coco_captions", 0, 256, 2))
    Image.fromarray(PHOTOS[0]).save(os.path.join(tmp_path, "a.jpg"))
    with pytest.raises(ReferenceStatsError, match="num_real=5 but"):
        list(reference._fid_inputs(str(tmp_path), 5, 256, 2))
