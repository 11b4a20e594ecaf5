"""PyTorch state dicts read as NumPy arrays, without PyTorch and without trusting the file.

The ImageNet Lite0 weights come as a PyTorch ``.pth`` file. Importing torch to read one
file would put torch (about 750 MB installed) in the environment `make run` builds; this
module reads the two formats ``torch.save`` writes instead:

- the legacy format (torch < 1.6, the weights package's file): a magic-number pickle, a
  protocol pickle, a system-info pickle, the object pickle (storages as persistent ids),
  the list of storage keys, then per storage an int64 element count and the raw bytes;
- the zip format (torch >= 1.6): ``<name>/data.pkl`` with the object and
  ``<name>/data/<key>`` with each storage's raw bytes, stored uncompressed.

A ``.pth`` file is attacker-controlled input, so the reader assumes every byte lies:

- No code runs. Every pickle of both formats goes through one restricted unpickler that
  resolves only the handful of globals a state dict of tensors needs (``OrderedDict``,
  ``_rebuild_tensor_v2``, the storage types) and refuses any other, so a file that would
  import something is an error, not an execution. What the pickle can reach (those
  globals, storages, tensors) refuses ``BUILD``, so a checked tensor stays as checked.
- Nothing is sized by a promise. Before the C unpickler sees a pickle, ``pickletools``
  walks it through a window of the file: every declared length must be backed by bytes
  that are there, the stream and its number of opcodes are bounded (which bounds the
  objects it can build), memo indices stay small, and only the opcodes a state dict
  uses are allowed. A model of the unpickler's stack makes sure that only strings,
  numbers and the like are ever dict keys, so hashing a key cannot take exponential
  time on a tuple of shared references.
- Memory is budgeted before it is spent (``ReadLimits``): each storage must fit in the
  file (or its zip member) and the per-tensor budget, each tensor's shape, strides and
  offset must stay inside its storage, and the storages plus the arrays returned
  (a stride-0 view is materialised, so it counts at its full size) must fit the total
  budget, all checked once the object pickle is read and before any tensor data is.
- Failures are one line: ``TorchFileError`` (a ``ValueError``) names the file and the
  problem; no unpickled object is ever rendered, names are truncated, and no
  ``MemoryError``, ``RecursionError`` or traceback escapes.

Tests check the arrays against ``torch.load`` on the packaged file and on files torch
writes, and each attack in its own memory-limited process.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard, cast

import numpy as np

from braintumor.core.redaction import one_line

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_MAGIC = b"PK\x03\x04"
MIB = 1 << 20
GIB = 1 << 30
MAX_DIMENSIONS = 32  # numpy 1.x's limit; no state dict comes close
MAX_KEY_CHARACTERS = 256  # torch's storage keys are short decimal numbers
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
# The opcodes that pickles of plain data and of state dicts use (protocols 0 to 4).
# Left out: instances of arbitrary classes (INST, OBJ, NEWOBJ, NEWOBJ_EX), the copyreg
# extension registry (EXT1/2/4), sets (their items are hashed, like dict keys) and
# protocol 5's out-of-band buffers.
ALLOWED_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2"
    " LONG LONG1 LONG4 FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE"
    " SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8 EMPTY_TUPLE TUPLE TUPLE1"
    " TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS EMPTY_DICT DICT SETITEM SETITEMS GLOBAL"
    " STACK_GLOBAL REDUCE BUILD PERSID BINPERSID PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET"
    " LONG_BINGET".split()
)
# What a dict key may be: values whose hash costs at most their own length.
_ATOMS = frozenset(
    {
        pickletools.pyint,
        pickletools.pylong,
        pickletools.pyinteger_or_bool,
        pickletools.pybool,
        pickletools.pyfloat,
        pickletools.pybytes_or_str,
        pickletools.pystring,
        pickletools.pybytes,
        pickletools.pyunicode,
        pickletools.pynone,
    }
)
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_ATOM, _OBJECT = "atom", "object"


class TorchFileError(ValueError):
    """The file is not a PyTorch state dict this reader can read safely (one line)."""


@dataclass(frozen=True)
class ReadLimits:
    """What reading one file may cost, checked before the memory is spent.

    ``total_bytes`` bounds the storages read plus the arrays returned; ``tensor_bytes``
    one storage or one returned array; ``pickle_bytes`` and ``pickle_opcodes`` one pickle
    stream (a state dict's pickle is about 150 bytes and 45 opcodes per tensor: the
    packaged Lite0 file has 42 kB and 14 000); ``zip_members`` the members of a zip file
    (one per storage plus a few; ``zipfile`` keeps about 600 bytes per member). The
    defaults read any EfficientNet (or a model a hundred times its size) and keep a
    hostile file to a few GB at most.
    """

    total_bytes: int = 4 * GIB
    tensor_bytes: int = 1 * GIB
    pickle_bytes: int = 64 * MIB
    pickle_opcodes: int = 1_000_000
    zip_members: int = 100_000


DEFAULT_LIMITS = ReadLimits()


def _name(text: str) -> str:
    """A name from the file, quoted and cut short enough for a one-line message."""
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


class _Sealed:
    """An object a pickle can reach: ``BUILD`` calls ``__setstate__``, which refuses, so
    the file cannot change it after the reader checked it (or change it for later reads)."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise TorchFileError("the pickle changes the state of an object it may not change")


class _Callable(_Sealed):
    """An allowed global that the pickle may call (with ``REDUCE``) but not modify."""

    __slots__ = ("function",)

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, *arguments: Any) -> Any:
        return self.function(*arguments)


class _StorageType(_Sealed):
    """``torch.FloatStorage`` and the like: the element type of a storage."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype


class _Storage(_Sealed):
    """A storage the object pickle declared; its bytes are read once the plan is checked."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype[Any], numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _Tensor(_Sealed):
    """A view of a storage (offset, shape, strides in elements), already checked to stay
    inside it; ``array`` copies it out."""

    __slots__ = ("storage", "offset", "shape", "stride", "count")

    def __init__(
        self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.count = math.prod(shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.storage.dtype.itemsize

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchFileError(f"storage {_name(self.storage.key)} has no data in the file")
        if self.count == 0:
            return np.zeros(self.shape, data.dtype)
        strides = tuple(step * data.itemsize for step in self.stride)
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], self.shape, strides, writeable=False
        )
        return np.array(view)


def _empty_ordered_dict(*arguments: Any) -> collections.OrderedDict[Any, Any]:
    """``collections.OrderedDict`` as torch pickles it: called without arguments, then
    filled by SETITEMS (whose keys the scan checked). Arguments would be hashed unchecked."""
    if arguments:
        raise TorchFileError("the pickle builds an OrderedDict from arguments")
    return collections.OrderedDict()


def _is_dimensions(value: object, largest: int) -> TypeGuard[tuple[int, ...]]:
    """Whether ``value`` is a shape or stride tuple: few non-negative ints, none huge."""
    return (
        type(value) is tuple
        and len(value) <= MAX_DIMENSIONS
        and all(type(item) is int and 0 <= item <= largest for item in value)
    )


class _StateReader:
    """The globals and persistent ids of the object pickle, each checked as it is built:
    storages against the file's size and the budget, tensors against their storage."""

    def __init__(self, limits: ReadLimits, file_size: int) -> None:
        self.limits, self.file_size = limits, file_size
        self.storages: dict[str, _Storage] = {}
        self.storage_bytes = 0
        self.globals: dict[tuple[str, str], object] = {
            ("collections", "OrderedDict"): _Callable(_empty_ordered_dict),
            ("torch._utils", "_rebuild_tensor_v2"): _Callable(self.rebuild_tensor),
        }
        for name, dtype in STORAGE_DTYPES.items():
            self.globals["torch", name] = _StorageType(dtype)

    def storage(self, pid: object) -> _Storage:
        """The storage of ``('storage', type, key, location, numel[, view])``."""
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage":
            raise TorchFileError("a persistent id that is not a storage")
        if len(pid) == 6 and pid[5] is not None:
            raise TorchFileError("storage views (torch < 0.4 files) are not supported")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType) or type(key) is not str:
            raise TorchFileError("a storage id without a storage type and a key")
        if len(key) > MAX_KEY_CHARACTERS or type(numel) is not int or numel < 0:
            raise TorchFileError(f"storage {_name(key)} has a malformed key or size")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != storage_type.dtype or known.numel != numel:
                raise TorchFileError(f"storage {_name(key)} is declared twice, differently")
            return known
        storage = _Storage(key, storage_type.dtype, numel)
        self._budget_storage(storage)
        self.storages[key] = storage
        return storage

    def _budget_storage(self, storage: _Storage) -> None:
        if storage.nbytes > self.limits.tensor_bytes:
            raise TorchFileError(
                f"storage {_name(storage.key)} declares {storage.nbytes} bytes, over the "
                f"per-tensor budget of {self.limits.tensor_bytes}"
            )
        self.storage_bytes += storage.nbytes
        if self.storage_bytes > self.file_size:
            raise TorchFileError(
                f"its storages declare {self.storage_bytes} bytes or more, but the file "
                f"has {self.file_size}"
            )

    def rebuild_tensor(
        self, storage: object, offset: object, shape: object, stride: object, *rest: object
    ) -> _Tensor:
        """``torch._utils._rebuild_tensor_v2``: a checked view of a storage, not yet read."""
        largest = self.limits.tensor_bytes
        if not isinstance(storage, _Storage) or len(rest) > 3:
            raise TorchFileError("a tensor that is not built on a storage")
        if type(offset) is not int or not 0 <= offset <= storage.numel:
            raise TorchFileError(f"a tensor of storage {_name(storage.key)} has a bad offset")
        if not _is_dimensions(shape, largest) or not _is_dimensions(stride, largest):
            raise TorchFileError("a tensor whose shape or strides are not small non-negative ints")
        if len(shape) != len(stride):
            raise TorchFileError("a tensor whose shape and strides differ in length")
        tensor = _Tensor(storage, offset, shape, stride)
        if tensor.nbytes > largest:
            raise TorchFileError(
                f"a tensor of shape {shape} would take {tensor.nbytes} bytes, over the "
                f"per-tensor budget of {largest}"
            )
        last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
        if tensor.count and last >= storage.numel:
            raise TorchFileError(f"a tensor reaches past the end of storage {_name(storage.key)}")
        return tensor


class _Unpickler(pickle.Unpickler):
    """The one unpickler for every pickle in the file. With no ``_StateReader`` (the
    header and key-list pickles of the legacy format) it resolves no global and no
    persistent id at all; with one, only the reader's globals."""

    def __init__(self, data: bytes, reader: _StateReader | None) -> None:
        super().__init__(io.BytesIO(data))
        self.reader = reader

    def find_class(self, module: str, name: str) -> Any:
        found = self.reader.globals.get((module, name)) if self.reader else None
        if found is None:
            qualified = _name(f"{module}.{name}").strip("'\"")
            raise TorchFileError(f"refuses the global {qualified} (not a plain state dict)")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self.reader is None:
            raise TorchFileError("a persistent id outside the state dict's pickle")
        return self.reader.storage(pid)


class _Window:
    """At most ``limit`` bytes of a stream from where it stands, kept as they are read.
    ``pickletools`` reads a pickle's declared lengths through it, so a length larger than
    the file asks the stream for no more than the file (or the limit) holds."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream, self.left, self.taken = stream, limit, bytearray()

    def _keep(self, data: bytes) -> bytes:
        self.left -= len(data)
        self.taken += data
        return data

    def read(self, size: int = -1) -> bytes:
        return self._keep(self.stream.read(self.left if size < 0 else min(size, self.left)))

    def readline(self, size: int = -1) -> bytes:
        return self._keep(self.stream.readline(self.left if size < 0 else min(size, self.left)))


class _StackModel:
    """The unpickler's object stack and mark stack, holding kinds (atom or object)
    instead of objects, popped as ``_pickle.c`` pops them (never below the last mark)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.marks: list[int] = []
        self.memo: dict[int, str] = {}

    def pop(self, count: int) -> list[str]:
        fence = self.marks[-1] if self.marks else 0
        if len(self.items) - count < fence:
            raise TorchFileError("a malformed pickle (it pops an empty stack)")
        start = len(self.items) - count
        taken = self.items[start:]
        del self.items[start:]
        return taken

    def pop_mark(self) -> list[str]:
        if not self.marks:
            raise TorchFileError("a malformed pickle (no MARK where it needs one)")
        mark = self.marks.pop()
        taken = self.items[mark:]
        del self.items[mark:]
        return taken

    def memo_step(self, name: str, argument: Any, position: int) -> None:
        if name in _MEMO_GETS:
            if argument not in self.memo:
                raise TorchFileError("a malformed pickle (it reads an empty memo slot)")
            self.items.append(self.memo[argument])
            return
        index = len(self.memo) if name == "MEMOIZE" else argument
        # The C unpickler sizes its memo array by the largest index: keep indices small.
        if index > position:
            raise TorchFileError(f"a pickle with a memo index ({index}) out of range")
        self.memo[index] = self.pop(1)[0]
        self.items.append(self.memo[index])

    def step(self, opcode: pickletools.OpcodeInfo, argument: Any, position: int) -> None:
        """Apply one opcode; refuse one that would hash something other than an atom."""
        name, before = opcode.name, opcode.stack_before
        if name in _MEMO_PUTS or name in _MEMO_GETS:
            self.memo_step(name, argument, position)
        elif name == "MARK":
            self.marks.append(len(self.items))
        elif name == "POP" and self.marks and self.marks[-1] == len(self.items):
            self.marks.pop()  # POP right after MARK drops the mark, as _pickle.c does
        else:
            has_mark = pickletools.markobject in before
            sliced = self.pop_mark() if has_mark else []
            popped = self.pop(len(before) - 2 if has_mark else len(before))
            keys = sliced[0::2] if name in ("SETITEMS", "DICT") else popped[1:2]
            if name in ("SETITEM", "SETITEMS", "DICT") and any(key != _ATOM for key in keys):
                raise TorchFileError("a pickle whose dict keys are not strings or numbers")
            if name == "DUP":
                self.items.extend(popped * 2)
            else:
                self.items.extend(
                    _ATOM if kind in _ATOMS else _OBJECT for kind in opcode.stack_after
                )


def _read_pickle(stream: IO[bytes], available: int, limits: ReadLimits) -> bytes:
    """The next pickle of ``stream``, checked opcode by opcode before anything unpickles
    it; ``available`` is how many bytes the stream has left."""
    window = _Window(stream, min(available, limits.pickle_bytes))
    model = _StackModel()
    try:
        for position, (opcode, argument, _) in enumerate(
            pickletools.genops(cast(IO[bytes], window))
        ):
            if position >= limits.pickle_opcodes:
                raise TorchFileError(f"a pickle of more than {limits.pickle_opcodes} opcodes")
            if opcode.name not in ALLOWED_OPCODES:
                raise TorchFileError(f"a pickle with the {opcode.name} opcode")
            model.step(opcode, argument, position)
    except ValueError as error:
        if isinstance(error, TorchFileError):
            raise
        if window.left == 0 and available > limits.pickle_bytes:
            raise TorchFileError(f"a pickle longer than {limits.pickle_bytes} bytes") from None
        raise TorchFileError(f"a truncated or malformed pickle ({one_line(error, 160)})") from None
    return bytes(window.taken)


def _checked_state(state: object, reader: _StateReader) -> dict[str, _Tensor]:
    """The state dict, once its names are strings, its values tensors and all of it fits
    the total budget (storages to read plus arrays to return)."""
    if not isinstance(state, dict):
        raise TorchFileError("not a state dict (a mapping of names to tensors)")
    total = reader.storage_bytes
    for key, value in state.items():
        if type(key) is not str or not isinstance(value, _Tensor):
            raise TorchFileError("not a state dict (a mapping of names to tensors)")
        total += value.nbytes
    if total > reader.limits.total_bytes:
        raise TorchFileError(
            f"reading it would take {total} bytes, over the budget of "
            f"{reader.limits.total_bytes} (ReadLimits.total_bytes)"
        )
    return state


def _remaining(stream: IO[bytes], file_size: int) -> int:
    return file_size - stream.tell()


def _plain(stream: IO[bytes], file_size: int, limits: ReadLimits) -> Any:
    """The next pickle of plain data (no globals, no persistent ids) in a legacy file."""
    return _Unpickler(_read_pickle(stream, _remaining(stream, file_size), limits), None).load()


def _read_legacy_storage(stream: IO[bytes], storage: _Storage, file_size: int) -> None:
    head = stream.read(8)
    if len(head) != 8 or storage.nbytes > _remaining(stream, file_size):
        raise TorchFileError("the file ends inside a tensor's data")
    (count,) = struct.unpack("<q", head)
    if count != storage.numel:
        raise TorchFileError(
            f"storage {_name(storage.key)} has {count} elements, not the {storage.numel} "
            "its id declares"
        )
    storage.data = np.frombuffer(stream.read(storage.nbytes), storage.dtype)


def _load_legacy(stream: IO[bytes], file_size: int, limits: ReadLimits) -> dict[str, _Tensor]:
    magic = _plain(stream, file_size, limits)
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise TorchFileError("not a PyTorch file (wrong magic number)")
    protocol = _plain(stream, file_size, limits)
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL:
        raise TorchFileError("an unknown legacy protocol version")
    system = _plain(stream, file_size, limits)
    if type(system) is not dict or system.get("little_endian", True) is not True:
        raise TorchFileError("not a little-endian file (or no system information)")
    reader = _StateReader(limits, file_size)
    data = _read_pickle(stream, _remaining(stream, file_size), limits)
    state = _checked_state(_Unpickler(data, reader).load(), reader)
    keys = _plain(stream, file_size, limits)
    if type(keys) is not list or not all(type(key) is str for key in keys):
        raise TorchFileError("its list of storage keys is not a list of strings")
    if sorted(keys) != sorted(reader.storages):
        raise TorchFileError("its list of storage keys does not match the storages")
    for key in keys:
        _read_legacy_storage(stream, reader.storages[key], file_size)
    return state


def _member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(name)
    except KeyError:
        raise TorchFileError(f"the zip file has no {_name(name)}") from None


def _member_bytes(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, file_size: int
) -> bytes:
    """The first ``size`` bytes of a member, once its declared sizes fit the archive."""
    if info.header_offset + info.compress_size > file_size or info.file_size < size:
        raise TorchFileError(
            f"{_name(info.filename)} declares sizes the {file_size}-byte archive cannot hold"
        )
    with archive.open(info) as member:
        data = member.read(size)
    if len(data) != size:
        raise TorchFileError(f"{_name(info.filename)} ends early")
    return data


def _zip_pickle(archive: zipfile.ZipFile, file_size: int, limits: ReadLimits) -> tuple[str, bytes]:
    """The folder prefix of a torch zip file and its ``data.pkl``, size-checked."""
    pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError("a zip file without exactly one data.pkl")
    info = pickles[0]
    if info.file_size > limits.pickle_bytes:
        raise TorchFileError(f"a data.pkl of {info.file_size} bytes, over {limits.pickle_bytes}")
    prefix = info.filename[: -len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist():  # torch >= 1.10 writes one
        order = archive.getinfo(f"{prefix}byteorder")
        if order.file_size > 16 or _member_bytes(archive, order, order.file_size, file_size) != (
            b"little"
        ):
            raise TorchFileError("not a little-endian file")
    return prefix, _member_bytes(archive, info, info.file_size, file_size)


def _declared_members(stream: IO[bytes], file_size: int) -> int:
    """How many members the zip's end record (or its zip64 record) declares, read before
    ``zipfile`` builds an object for each; 0 where there is no end record to read
    (``zipfile`` then refuses the file itself)."""
    tail_size = min(file_size, 22 + 0xFFFF)  # the end record, then a comment of at most 64 kB
    stream.seek(file_size - tail_size)
    tail = stream.read(tail_size)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        return 0
    (members,) = struct.unpack_from("<H", tail, end + 10)
    if members == 0xFFFF and end >= 20 and tail[end - 20 : end - 16] == b"PK\x06\x07":
        (zip64_end,) = struct.unpack_from("<Q", tail, end - 12)
        stream.seek(min(zip64_end, file_size))
        record = stream.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            (members,) = struct.unpack_from("<Q", record, 32)
    return int(members)


def _load_zip(stream: IO[bytes], file_size: int, limits: ReadLimits) -> dict[str, _Tensor]:
    members = _declared_members(stream, file_size)
    if members > limits.zip_members:
        raise TorchFileError(f"a zip file of {members} members, over {limits.zip_members}")
    stream.seek(0)
    with zipfile.ZipFile(stream) as archive:
        prefix, member = _zip_pickle(archive, file_size, limits)
        reader = _StateReader(limits, file_size)
        data = _read_pickle(io.BytesIO(member), len(member), limits)
        state = _checked_state(_Unpickler(data, reader).load(), reader)
        for key, storage in reader.storages.items():
            info = _member(archive, f"{prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise TorchFileError(
                    f"storage {_name(key)} is compressed (torch.save stores tensors as they are)"
                )
            raw = _member_bytes(archive, info, storage.nbytes, file_size)
            storage.data = np.frombuffer(raw, storage.dtype)
    return state


def _load(path: Path, limits: ReadLimits) -> dict[str, np.ndarray]:
    with path.open("rb") as stream:
        file_size = os.fstat(stream.fileno()).st_size
        is_zip = stream.read(len(ZIP_MAGIC)) == ZIP_MAGIC  # as torch.load tells them apart
        stream.seek(0)
        loader = _load_zip if is_zip else _load_legacy
        state = loader(stream, file_size, limits)
    return {key: tensor.array() for key, tensor in state.items()}


# What parsing a hostile file can raise besides TorchFileError, all turned into one line.
_UNREADABLE = (
    pickle.UnpicklingError,
    EOFError,
    LookupError,
    ValueError,
    TypeError,
    AttributeError,
    ArithmeticError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    RuntimeError,  # RecursionError, NotImplementedError (an unknown zip compression)
    MemoryError,
    OSError,
)


def load_state_dict(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Name -> array of a PyTorch state dict file (either format), as ``torch.load`` reads it.

    Raises ``FileNotFoundError`` for a missing file and ``TorchFileError`` (one line naming
    the file) for anything that is not a plain state dict of tensors, or that would cost
    more than ``limits``. Runs no code from the file.
    """
    path = Path(path)
    try:
        return _load(path, limits)
    except FileNotFoundError:
        raise
    except TorchFileError as error:
        raise TorchFileError(one_line(TorchFileError(f"{path}: {error}"))) from None
    except _UNREADABLE as error:
        problem = f"{path}: unreadable ({type(error).__name__}: {one_line(error, 200)})"
        raise TorchFileError(one_line(TorchFileError(problem))) from None
