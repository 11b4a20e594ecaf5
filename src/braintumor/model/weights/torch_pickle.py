"""PyTorch state dicts read as NumPy arrays, without PyTorch.

The ImageNet Lite0 weights come as a PyTorch ``.pth`` file. Importing torch to read one
file would put torch (about 750 MB installed) in the environment `make run` builds; this
module reads the two formats ``torch.save`` writes instead:

- the legacy format (torch < 1.6, the weights package's file): a magic-number pickle, a
  protocol pickle, a system-info pickle, the object pickle (storages as persistent ids),
  the list of storage keys, then per storage an int64 element count and the raw bytes;
- the zip format (torch >= 1.6): ``<name>/data.pkl`` with the object and
  ``<name>/data/<key>`` with each storage's raw bytes.

Like ``torch.load(weights_only=True)`` it runs no code from the file: the unpickler
resolves only the handful of globals a state dict of tensors needs and refuses any
other, so a file that would import something is an error, not an execution. Tests check
the arrays against ``torch.load`` on the packaged file and on files torch writes.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchFileError(ValueError):
    """The file is not a PyTorch state dict this reader can read safely."""


@dataclass
class _Storage:
    dtype: np.dtype[Any]
    numel: int
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        if self.storage.data is None:
            raise TorchFileError("a tensor's storage has no data in the file")
        data = self.storage.data
        itemsize = data.dtype.itemsize
        reach = sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        needed = self.offset + reach + 1
        if any(n == 0 for n in self.shape):
            return np.zeros(self.shape, data.dtype)
        if self.offset < 0 or needed > data.size:
            raise TorchFileError("a tensor reaches past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], self.shape, tuple(s * itemsize for s in self.stride)
        )
        return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, shape: Any, stride: Any, *_: Any) -> _Tensor:
    sizes, strides = tuple(int(n) for n in shape), tuple(int(s) for s in stride)
    if len(sizes) != len(strides):
        raise TorchFileError("a tensor whose shape and strides differ in length")
    return _Tensor(storage, int(offset), sizes, strides)


class _Unpickler(pickle.Unpickler):
    """Resolves only what a state dict of tensors needs; storages by persistent id."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise TorchFileError(f"refuses the global {module}.{name} (not a plain state dict)")

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchFileError(f"unknown persistent id {str(pid)[:60]}")
        if len(pid) > 5 and pid[5] is not None:
            raise TorchFileError("storage views (torch < 0.4 files) are not supported")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(dtype, np.dtype):
            raise TorchFileError("a storage of unknown type")
        return self.storages.setdefault(key, _Storage(dtype, numel))


def _load_legacy(stream: IO[bytes]) -> Any:
    if pickle.load(stream) != LEGACY_MAGIC:
        raise TorchFileError("not a PyTorch file (wrong magic number)")
    pickle.load(stream)  # protocol version
    pickle.load(stream)  # system info (endianness, type sizes)
    unpickler = _Unpickler(stream)
    result = unpickler.load()
    for key in pickle.load(stream):
        storage = unpickler.storages[str(key)]
        (count,) = struct.unpack("<q", stream.read(8))
        raw = stream.read(count * storage.dtype.itemsize)
        if len(raw) != count * storage.dtype.itemsize:
            raise TorchFileError("the file ends inside a tensor's data")
        storage.data = np.frombuffer(raw, storage.dtype)
    return result


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError("a zip file without one data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])))
    result = unpickler.load()
    for key, storage in unpickler.storages.items():
        raw = archive.read(f"{prefix}data/{key}")
        storage.data = np.frombuffer(raw, storage.dtype, count=storage.numel)
    return result


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Name -> array of a PyTorch state dict file (either format), as ``torch.load`` reads it.

    Raises ``FileNotFoundError`` for a missing file and ``TorchFileError`` (one line) for
    anything that is not a plain state dict of tensors.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            if zipfile.is_zipfile(stream):
                stream.seek(0)
                with zipfile.ZipFile(stream) as archive:
                    state = _load_zip(archive)
            else:
                stream.seek(0)
                state = _load_legacy(stream)
    except FileNotFoundError:
        raise
    except TorchFileError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        struct.error,
        zipfile.BadZipFile,
        TypeError,
        IndexError,
        AttributeError,
    ) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise TorchFileError(f"unreadable ({type(error).__name__}: {first[:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, _Tensor) for v in state.values()):
        raise TorchFileError("not a state dict (a mapping of names to tensors)")
    return {str(key): tensor.array() for key, tensor in state.items()}
