"""Bad input to the U-Net loader: every case gives an error that names the file/field."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from d2g_jax.models.unet import load_unet
from d2g_jax.models.unet_config import UnsupportedConfigError
from d2g_jax.models.weights import WeightsError, read_safetensors, write_safetensors

CFG = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=2,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("good") / "unet")
    TorchUNet(**CFG).save_pretrained(folder)
    return folder


@pytest.fixture
def copy(good, tmp_path):
    dst = str(tmp_path / "unet")
    shutil.copytree(good, dst)
    return dst


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsError, match="not a folder"):
        load_unet(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        load_unet(str(tmp_path))


def test_folder_without_weights(copy):
    os.remove(os.path.join(copy, WEIGHTS))
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model"):
        load_unet(copy)


def test_missing_tensor_is_named(copy):
    t = dict(read_safetensors(os.path.join(copy, WEIGHTS)))
    t = {k: np.array(v) for k, v in t.items() if k != "down_blocks.0.resnets.0.conv1.weight"}
    write_safetensors(os.path.join(copy, WEIGHTS), t)
    with pytest.raises(WeightsError, match=r"missing tensors \(1\): down_blocks\.0\.resnets\.0\.conv1\.weight"):
        load_unet(copy)


def test_unexpected_tensor_is_named(copy):
    t = {k: np.array(v) for k, v in read_safetensors(os.path.join(copy, WEIGHTS)).items()}
    t["extra.layer.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(os.path.join(copy, WEIGHTS), t)
    with pytest.raises(WeightsError, match=r"unexpected tensors \(1\): extra\.layer\.weight"):
        load_unet(copy)


def test_wrong_shape_is_named(copy):
    t = {k: np.array(v) for k, v in read_safetensors(os.path.join(copy, WEIGHTS)).items()}
    t["conv_in.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    write_safetensors(os.path.join(copy, WEIGHTS), t)
    with pytest.raises(WeightsError, match=r"shape mismatches \(1\): conv_in\.weight"):
        load_unet(copy)


def test_config_weights_mismatch(copy):
    _edit_config(copy, block_out_channels=[16, 48])
    with pytest.raises(WeightsError, match="does not match the model built from its config"):
        load_unet(copy)


def test_truncated_file(copy):
    path = os.path.join(copy, WEIGHTS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(WeightsError, match="truncated"):
        load_unet(copy)


def test_garbage_file(copy):
    with open(os.path.join(copy, WEIGHTS), "wb") as f:
        f.write(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=WEIGHTS):
        load_unet(copy)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(addition_embed_type="image"), "addition_embed_type"),
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), "SimpleCrossAttnDownBlock2D"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
        (dict(only_cross_attention=True), "only_cross_attention"),
        (dict(encoder_hid_dim=32), "encoder_hid_dim"),
        (dict(some_new_field=1), "some_new_field"),
    ],
)
def test_unsupported_config_names_field(copy, change, field):
    _edit_config(copy, **change)
    with pytest.raises(UnsupportedConfigError, match=field) as e:
        load_unet(copy)
    assert "config.json" in str(e.value)
