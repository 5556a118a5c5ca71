"""Reading PyTorch `torch.save` files (`.pth`, `.pth.tar`, `.pt`) into numpy, without importing torch.

The E-LatentLPIPS checkpoints (§3.2, Appendix B), torchvision's VGG16 weights and the LPIPS linear heads ship
only as `torch.save` pickles, while the runtime of this package must not depend on torch. Two on-disk formats
exist and both are read here:

* the zip format (torch >= 1.6): `<prefix>/data.pkl` holds the pickled object tree and every storage is a
  separate, uncompressed entry `<prefix>/data/<key>` (raw bytes, byte order in `<prefix>/byteorder`);
* the legacy format (torch < 1.6, e.g. torchvision's 2017 `vgg16-397923af.pth`, LPIPS' `vgg.pth`): a stream of
  pickles (magic number, protocol version, system info, object tree, storage-key list) followed by every
  storage as an 8-byte element count and its raw bytes.

The pickle is read with a restricted `Unpickler`: tensors are rebuilt from storages
(`torch._utils._rebuild_tensor_v2` and its older/parameter variants), `collections.OrderedDict` is allowed,
and any other class is replaced by an inert `Opaque` record (no code from the file is ever run). Storages are
`np.memmap` views of the file (copies only for compressed or big-endian data), so reading a 500 MB trunk whose
classifier is never used costs no more than reading the used tensors.

Errors (not a torch file, truncated, corrupt pickle, unsupported tensor kind) raise `WeightsError` naming the
file.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from d2g_jax.models.weights import WeightsError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class Opaque:
    """Inert stand-in for a pickled object of a class we do not reconstruct (e.g. `argparse.Namespace`)."""

    qualname = "?"
    args: tuple = ()  # class defaults: NEWOBJ (protocol 2) creates instances without calling __init__
    kwargs: dict | None = None
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque({self.qualname})"


class _Storage:
    """A typed 1-D storage: `dtype` and `numel` are known when unpickled, `data` once the bytes are located."""

    def __init__(self, dtype: np.dtype, numel: int, key: str) -> None:
        self.dtype, self.numel, self.key = np.dtype(dtype), int(numel), key
        self.data: np.ndarray | None = None
        self.base: tuple[_Storage, int] | None = None  # legacy storage views: (root, element offset)

    def array(self) -> np.ndarray:
        if self.base is not None:
            root, offset = self.base
            return root.array()[offset : offset + self.numel]
        assert self.data is not None
        return self.data


class _LazyTensor:
    """A tensor whose storage bytes may not be located yet (legacy files store them after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _LazyTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused) -> Any:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell `bytes` (e.g. inside numpy scalars)
}


def _numpy_global(name: str) -> Any:
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    return {"scalar": ma.scalar, "_reconstruct": ma._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.IOBase, path: str, storages: dict[str, _Storage]) -> None:
        super().__init__(file, encoding="latin1")  # latin1: py2-era legacy pickles hold byte strings
        self.path, self.storages = path, storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module.startswith("torch") and (name.startswith("_rebuild") or name.endswith("Storage")):
            raise WeightsError(
                f"{self.path}: holds a tensor kind this reader does not support ({module}.{name}); "
                "re-save it with torch.save(dense_cpu_state_dict) using a standard dtype."
            )
        if module.startswith("torch.nn.modules"):
            raise WeightsError(
                f"{self.path}: holds a pickled {module}.{name} module, not a state dict; "
                "save model.state_dict() instead."
            )
        if module.startswith("numpy") and name in ("scalar", "_reconstruct", "ndarray", "dtype"):
            return _numpy_global(name)  # numpy scalars/arrays in metadata (e.g. best_acc1)
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            raise WeightsError(
                f"{self.path}: holds a pickled {kind!r} object (e.g. a whole nn.Module), not plain tensors; "
                "save model.state_dict() instead."
            )
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, type) or storage_type not in _STORAGE_DTYPES.values():
            raise WeightsError(f"{self.path}: storage {key!r} has unsupported type {storage_type!r}.")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, numel, key)
        root = self.storages[key]
        if view is None:
            return root
        view_key, offset, view_size = view  # pre-0.4 legacy files: a storage view into a root storage
        sub = self.storages.setdefault(str(view_key), _Storage(storage_type, view_size, str(view_key)))
        sub.base = (root, int(offset))
        return sub


def _materialise(t: _LazyTensor, path: str) -> np.ndarray:
    base = t.storage.array()
    item = base.dtype.itemsize
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride):
        raise WeightsError(f"{path}: tensor with negative size/stride {t.size}/{t.stride} (corrupt file).")
    if 0 in t.size:
        return np.zeros(t.size, base.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or last >= base.size:
        raise WeightsError(
            f"{path}: tensor of size {t.size} at offset {t.offset} runs past its storage {t.storage.key!r} "
            f"({base.size} elements): truncated or corrupt file."
        )
    arr = np.lib.stride_tricks.as_strided(
        base[t.offset :], shape=t.size, strides=[s * item for s in t.stride], writeable=False
    )
    return arr


def _resolve(obj: Any, path: str) -> Any:
    """Replaces every `_LazyTensor` in the tree (dicts, lists, tuples, opaque records) by a numpy array."""
    if isinstance(obj, _LazyTensor):
        return _materialise(obj, path)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, path)
        return out
    if isinstance(obj, list):
        return [_resolve(v, path) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, path) for v in obj)
    if isinstance(obj, Opaque):
        obj.args = _resolve(obj.args, path)
        obj.state = _resolve(obj.state, path)
    return obj


def _storage_view(mm: np.ndarray, start: int, st: _Storage, big_endian: bool, path: str) -> np.ndarray:
    nbytes = st.numel * st.dtype.itemsize
    if start + nbytes > mm.size:
        raise WeightsError(f"{path}: storage {st.key!r} runs past the end of the file (truncated download?).")
    raw = mm[start : start + nbytes]
    if big_endian and st.dtype.itemsize > 1:
        return raw.view(st.dtype.newbyteorder(">")).astype(st.dtype)
    return raw.view(st.dtype)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise WeightsError(f"{path}: zip file without exactly one data.pkl; not a torch.save checkpoint.")
        prefix = pkls[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), path, storages).load()
        big_endian = f"{prefix}byteorder" in infos and zf.read(f"{prefix}byteorder").strip() == b"big"
        mm = np.memmap(path, dtype=np.uint8, mode="r") if storages else None
        with open(path, "rb") as f:
            for key, st in storages.items():
                if st.base is not None:
                    continue
                info = infos.get(f"{prefix}data/{key}")
                if info is None:
                    raise WeightsError(f"{path}: storage {key!r} is referenced but {prefix}data/{key} is missing.")
                if info.compress_type != zipfile.ZIP_STORED:  # not written by torch.save; read a copy
                    buf = np.frombuffer(zf.read(info), np.uint8)
                    st.data = _storage_view(buf, 0, st, big_endian, path)
                    continue
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    raise WeightsError(f"{path}: bad zip local header for {info.filename} (corrupt file).")
                start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                start += int.from_bytes(header[28:30], "little")
                if info.file_size < st.numel * st.dtype.itemsize:
                    raise WeightsError(
                        f"{path}: storage {key!r} holds {info.file_size} bytes, needs "
                        f"{st.numel * st.dtype.itemsize} (truncated or corrupt file)."
                    )
                st.data = _storage_view(mm, start, st, big_endian, path)
    return _resolve(obj, path)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise WeightsError(f"{path}: not a torch.save file (neither zip nor legacy magic number).")
        protocol = pickle.load(f)
        if protocol != _LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: unsupported legacy torch protocol version {protocol!r}.")
        sys_info = pickle.load(f)
        big_endian = not sys_info.get("little_endian", True)
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(f, path, storages).load()
        keys = pickle.load(f)
        pos = f.tell()
    mm = np.memmap(path, dtype=np.uint8, mode="r") if keys else np.zeros(0, np.uint8)
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise WeightsError(f"{path}: storage list names {key!r}, which no tensor uses (corrupt file).")
        if pos + 8 > mm.size:
            raise WeightsError(f"{path}: storage {key!r} runs past the end of the file (truncated download?).")
        count = int(np.frombuffer(mm[pos : pos + 8].tobytes(), "<i8" if not big_endian else ">i8")[0])
        if count != st.numel:
            raise WeightsError(f"{path}: storage {key!r} has {count} elements, its header says {st.numel}.")
        st.data = _storage_view(mm, pos + 8, st, big_endian, path)
        pos += 8 + count * st.dtype.itemsize
    return _resolve(obj, path)


def load(path: str | os.PathLike) -> Any:
    """Loads a `torch.save` file into plain Python: dicts/lists stay, tensors become read-only numpy arrays.

    Arrays are memory-mapped views of the file where possible (copy with `np.array(x)` to own the data).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file.")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise WeightsError(f"{path}: zip archive without a readable directory: truncated or corrupt file.")
        if head[:1] != b"\x80":
            raise WeightsError(f"{path}: not a torch.save file (neither a zip archive nor a legacy pickle).")
        return _load_legacy(path)
    except WeightsError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OSError,
        UnicodeDecodeError,
    ) as e:
        raise WeightsError(f"{path}: cannot read as a torch.save checkpoint ({type(e).__name__}: {e}).") from e


def flatten_arrays(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """`{'a': {'b': x}}` → `{'a.b': x}`, keeping only array leaves (dicts are walked, other values dropped)."""
    out: dict[str, np.ndarray] = {}
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten_arrays(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_state_dict(
    path: str | os.PathLike, *, key: str | None = None, strip_prefix: tuple[str, ...] = ("module.",)
) -> dict[str, np.ndarray]:
    """`{name: array}` from a checkpoint: `obj[key]` if `key` is given (e.g. `'state_dict'`), else the whole file.

    Nested dicts are flattened with dots; a leading `module.` (from `nn.DataParallel`) is stripped from names.
    """
    obj = load(path)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(f"{os.fspath(path)}: no {key!r} entry in the checkpoint (found {found}).")
        obj = obj[key]
    out: dict[str, np.ndarray] = {}
    for name, arr in flatten_arrays(obj).items():
        for p in strip_prefix:
            if name.startswith(p):
                name = name[len(p) :]
                break
        out[name] = arr
    return out
