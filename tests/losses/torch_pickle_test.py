"""`d2g_jax.models.torch_pickle` against `torch.load` on files written by `torch.save` (zip and legacy formats),
its errors on bad files, and that reading (and the loss loaders) never import torch."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2g_jax.models import torch_pickle
from d2g_jax.models.weights import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    sd["f16"] = torch.randn(7, generator=g).half()
    sd["bf16"] = torch.randn(3, 4, generator=g).bfloat16()
    sd["f64"] = torch.randn(2, 2, generator=g).double()
    sd["i64"] = torch.arange(-3, 9)
    sd["i32"] = torch.arange(5, dtype=torch.int32)
    sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
    sd["bool"] = torch.rand(4, generator=g) > 0.5
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["base"] = base
    sd["view_row"] = base[2]  # shares base's storage at an offset
    sd["transposed"] = base.t()  # non-contiguous strides
    sd["strided"] = base[::2, 1::2]
    sd["expanded"] = torch.randn(1, 5, generator=g).expand(4, 5)  # stride 0
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    sd["bn.num_batches_tracked"] = torch.tensor(17)
    return sd


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load(tmp_path, zip_format):
    sd = _tensors()
    obj = {"state_dict": sd, "best_acc1": torch.tensor(68.26), "epoch": 90, "arch": "vgg16_bn",
           "acc": np.float64(0.5), "nested": {"a": [torch.ones(2), (1, "x")]}}  # fmt: skip
    path = str(tmp_path / "ckpt.pth.tar")
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    ref = torch.load(path, map_location="cpu", weights_only=False)
    ours = torch_pickle.load(path)
    assert list(ours["state_dict"]) == list(ref["state_dict"])  # OrderedDict order kept
    for k, t in ref["state_dict"].items():
        a = ours["state_dict"][k]
        assert isinstance(a, np.ndarray) and a.shape == tuple(t.shape), k
        assert a.dtype.name == {"torch.bfloat16": "bfloat16"}.get(str(t.dtype), _as_numpy(t).dtype.name), k
        np.testing.assert_array_equal(a.astype(np.float32) if k == "bf16" else a, _as_numpy(t), err_msg=k)
    assert float(ours["best_acc1"]) == pytest.approx(float(ref["best_acc1"]))
    assert ours["epoch"] == 90 and ours["arch"] == "vgg16_bn" and ours["acc"] == 0.5
    np.testing.assert_array_equal(ours["nested"]["a"][0], np.ones(2, np.float32))
    assert ours["nested"]["a"][1] == (1, "x")
    flat = torch_pickle.read_state_dict(path, key="state_dict")
    assert set(flat) == set(sd)


def test_read_state_dict_flattens_and_strips_dataparallel_prefix(tmp_path):
    path = str(tmp_path / "m.pth")
    torch.save({"module.a.weight": torch.ones(2), "module.b": {"c": torch.zeros(1)}, "note": "x"}, path)
    assert sorted(torch_pickle.read_state_dict(path)) == ["a.weight", "b.c"]
    with pytest.raises(WeightsError, match=r"m\.pth: no 'state_dict' entry"):
        torch_pickle.read_state_dict(path, key="state_dict")


def test_unknown_classes_stay_inert(tmp_path):
    import argparse

    path = str(tmp_path / "args.pth")
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(1)}, path)
    out = torch_pickle.load(path)
    assert isinstance(out["args"], torch_pickle.Opaque) and "Namespace" in repr(out["args"])
    assert out["w"].tolist() == [1.0]


def test_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="nope.pth: no such file"):
        torch_pickle.load(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: not a torch.save file"):
        torch_pickle.load(str(garbage))
    for zip_format in (True, False):
        path = tmp_path / f"trunc_{zip_format}.pth"
        torch.save({"w": torch.randn(1000)}, str(path), _use_new_zipfile_serialization=zip_format)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 2000])
        with pytest.raises(WeightsError, match=f"trunc_{zip_format}.pth: .*(truncated|past the end)"):
            torch_pickle.load(str(path))
    whole = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), str(whole))
    with pytest.raises(WeightsError, match="module.pth: holds a pickled torch.nn.modules.linear.Linear module"):
        torch_pickle.load(str(whole))
    sparse = tmp_path / "sparse.pth"
    torch.save({"s": torch.eye(3).to_sparse()}, str(sparse))
    with pytest.raises(WeightsError, match="sparse.pth: holds a tensor kind this reader does not support"):
        torch_pickle.load(str(sparse))


def test_runtime_never_imports_torch(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"state_dict": {"module.x": torch.ones(3)}}, path)
    code = (
        "import sys\n"
        "from d2g_jax.models import torch_pickle\n"
        "import d2g_jax.losses.elatentlpips, d2g_jax.losses.latent_vgg, d2g_jax.losses.augment\n"
        f"assert torch_pickle.read_state_dict({path!r}, key='state_dict')['x'].tolist() == [1.0, 1.0, 1.0]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
