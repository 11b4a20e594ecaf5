"""The torch-free reader of PyTorch state dicts, checked against torch itself and attacked.

Files torch writes (and the packaged ImageNet file) must read exactly as ``torch.load``
reads them. Hostile files (each built here, in a temporary folder) must be refused with
one line naming the file, without running their code and without spending their memory.
Each hostile file is read in a child process under ``RLIMIT_AS`` (1 GiB), so a
regression fails its test instead of taking the machine down; the child reports its
peak RSS. ``bench/torch_pickle_bombs.py`` builds the same files with the ``build_``
functions below.

To see these tests fail on another version of the reader, point the children at a copy
of it: ``git show HEAD~1:src/braintumor/model/weights/torch_pickle.py > /tmp/old.py``,
then ``TORCH_PICKLE_SOURCE=/tmp/old.py pytest tests/unit/model/test_torch_pickle.py``.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import re
import resource
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from braintumor.model.weights.convert import package_state_dict_path
from braintumor.model.weights.torch_pickle import LEGACY_MAGIC, TorchFileError, load_state_dict

GIB = 1 << 30
CHILD_MEMORY = GIB
LEGACY_SYSTEM = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}
MAGIC, PROTOCOL, SYSTEM, OBJECT, KEYS = range(5)  # the legacy format's pickles, in order


def tensors() -> dict[str, torch.Tensor]:
    """Dtypes, a transposed (non-contiguous) tensor, a slice with a storage offset, an
    expanded (stride 0) view, an empty one."""
    return {
        "conv.weight": torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)),
        "transposed": torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2),
        "slice": torch.arange(10.0, dtype=torch.float64)[3:8],
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "steps": torch.tensor(7),
        "ints": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "mask": torch.tensor([True, False]),
        "expanded": torch.arange(3.0).expand(4, 3),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_writes(tmp_path: Path, zip_format: bool) -> None:
    state = tensors()
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    read = load_state_dict(path)
    assert list(read) == list(state)
    for name, tensor in state.items():
        expected = tensor.numpy()
        assert read[name].dtype == expected.dtype and read[name].shape == expected.shape, name
        np.testing.assert_array_equal(read[name], expected, err_msg=name)


def test_the_packaged_imagenet_file_equals_torch_load() -> None:
    path = package_state_dict_path()
    expected = torch.load(path, map_location="cpu", weights_only=True)
    read = load_state_dict(path)
    assert list(read) == list(expected) and len(read) == 296
    for name, tensor in expected.items():
        np.testing.assert_array_equal(read[name], tensor.numpy(), err_msg=name)


# --- Hostile files, written without torch's help where torch would not write them. ---


@dataclass(frozen=True)
class Storage:
    """A storage as a crafted file declares it (its persistent id)."""

    key: str
    numel: int
    type_name: str = "FloatStorage"


@dataclass(frozen=True)
class Tensor:
    """A tensor as a crafted file declares it; ``state`` is pickled as BUILD's argument."""

    storage: Storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    state: Any = None


@dataclass(frozen=True)
class Pid:
    """A persistent id written as it is, whatever it holds."""

    value: Any


class Payload:
    """Unpickling this would call ``os.system`` and create ``marker``: a reader that runs
    code from the file leaves the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


class Crafter(pickle.Pickler):
    """Writes ``Storage``, ``Tensor`` and ``Pid`` as torch writes storages and tensors."""

    def __init__(self, stream: io.BytesIO, legacy: bool) -> None:
        super().__init__(stream, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Pid):
            return obj.value
        if isinstance(obj, Storage):
            pid = ("storage", getattr(torch, obj.type_name), obj.key, "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            arguments = (obj.storage, obj.offset, obj.shape, obj.stride, False)
            hooks: collections.OrderedDict[str, Any] = collections.OrderedDict()
            return (torch._utils._rebuild_tensor_v2, (*arguments, hooks), obj.state)
        return NotImplemented


def crafted(obj: Any, legacy: bool = True) -> bytes:
    stream = io.BytesIO()
    Crafter(stream, legacy).dump(obj)
    return stream.getvalue()


def write_legacy(
    path: Path,
    state: Any,
    data: dict[str, tuple[int, bytes]],
    replace: dict[int, bytes] | None = None,
) -> Path:
    """A legacy-format file: the five pickles (any replaced by raw bytes), then per
    storage its element count and bytes, as ``data`` gives them."""
    pickles = [pickle.dumps(value, 2) for value in (LEGACY_MAGIC, 1001, LEGACY_SYSTEM)]
    pickles += [crafted(state), pickle.dumps(list(data), 2)]
    for index, raw in (replace or {}).items():
        pickles[index] = raw
    storages = [struct.pack("<q", count) + raw for count, raw in data.values()]
    path.write_bytes(b"".join(pickles + storages))
    return path


def write_zip(path: Path, data_pkl: bytes, data: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, raw in data.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def one_float(shape: tuple[int, ...], stride: tuple[int, ...]) -> dict[str, Tensor]:
    return {"w": Tensor(Storage("0", 1), shape, stride)}


FLOAT = {"0": (1, struct.pack("<f", 1.5))}
FLOAT_DATA = {"0": struct.pack("<f", 1.5)}


def deep_tuple_pickle(depth: int) -> bytes:
    """Opcodes that leave t(depth) on the stack, where t0 = () and t(i+1) = (ti, ti), each
    memoized: 8 bytes per level, 2**depth leaves when walked (rendered, hashed, compared)."""
    opcodes = b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
    for level in range(1, depth + 1):
        below = bytes([level - 1])
        opcodes += (
            b"h" + below + b"h" + below + b"\x86q" + bytes([level]) + b"0"
        )  # GET GET TUPLE2 PUT POP
    return opcodes + b"h" + bytes([depth])


def build_legacy_magic_payload(folder: Path) -> Path:
    """The finding: the legacy magic-number pickle was read with plain ``pickle.load``."""
    replace = {MAGIC: pickle.dumps(Payload(folder / "pwned-magic"), 2)}
    return write_legacy(folder / "magic-payload.pth", one_float((1,), (1,)), FLOAT, replace)


def build_legacy_keys_payload(folder: Path) -> Path:
    """The finding: the legacy storage-key pickle was read with plain ``pickle.load``."""
    replace = {KEYS: pickle.dumps(Payload(folder / "pwned-keys"), 2)}
    return write_legacy(folder / "keys-payload.pth", one_float((1,), (1,)), FLOAT, replace)


def build_zip_pickle_payload(folder: Path) -> Path:
    data_pkl = pickle.dumps({"w": Payload(folder / "pwned-zip")}, 2)
    return write_zip(folder / "zip-payload.pth", data_pkl, {})


def build_stride_zero(folder: Path) -> Path:
    """A 356-byte file torch itself writes: 1 float expanded to 2**29 (2 GiB once copied)."""
    path = folder / "stride-zero.pth"
    torch.save({"w": torch.zeros(1).expand(1 << 29)}, path, _use_new_zipfile_serialization=False)
    return path


def build_zip_deflate_bomb(folder: Path) -> Path:
    """A 2.6 MB zip whose storage member inflates to 600 MB of zeros, all declared."""
    numel, chunk = 150_000_000, bytes(1 << 24)
    path = folder / "deflate-bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        state = {"w": Tensor(Storage("0", numel), (numel,), (1,))}
        archive.writestr("archive/data.pkl", crafted(state, legacy=False))
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            left = numel * 4
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def build_zip_shape_4tb(folder: Path) -> Path:
    """One stored float viewed as a 1024**4 tensor: 4 TiB once copied."""
    data_pkl = crafted(one_float((1024,) * 4, (0,) * 4), legacy=False)
    return write_zip(folder / "shape-4tb.pth", data_pkl, {"0": struct.pack("<f", 1.5)})


def build_legacy_count_2_40(folder: Path) -> Path:
    """A 1-element storage whose data section says 2**40 elements follow."""
    data = {"0": (1 << 40, struct.pack("<f", 1.5))}
    return write_legacy(folder / "count-2-40.pth", one_float((1,), (1,)), data)


def build_legacy_storage_2_40(folder: Path) -> Path:
    """A storage id declaring 2**40 elements, its data section agreeing, 4 bytes there."""
    state = {"w": Tensor(Storage("0", 1 << 40), (1,), (1,))}
    data = {"0": (1 << 40, struct.pack("<f", 1.5))}
    return write_legacy(folder / "storage-2-40.pth", state, data)


def build_exponential_pid(folder: Path) -> Path:
    """A persistent id of 40 levels of shared tuples: 2**40 leaves when rendered."""
    deep: tuple[Any, ...] = ()
    for _ in range(40):
        deep = (deep, deep)
    return write_legacy(folder / "exponential-pid.pth", {"w": Pid((deep,))}, {})


def build_hash_bomb(folder: Path) -> Path:
    """A dict whose key is 64 levels of shared tuples: hashing it takes 2**64 steps."""
    object_pickle = b"\x80\x02}" + deep_tuple_pickle(64) + b"K\x01s."
    return write_legacy(folder / "hash-bomb.pth", {}, {}, {OBJECT: object_pickle})


def build_memo_index(folder: Path) -> Path:
    """LONG_BINPUT 2**31 - 1: the C unpickler sizes its memo array to twice that (32 GB)."""
    object_pickle = b"\x80\x02}r\xff\xff\xff\x7f."
    return write_legacy(folder / "memo-index.pth", {}, {}, {OBJECT: object_pickle})


def build_bytes_length(folder: Path) -> Path:
    """A first pickle declaring a 1 TiB bytes object (BINBYTES8) in a 151-byte file."""
    replace = {MAGIC: b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"short."}
    return write_legacy(folder / "bytes-length.pth", {}, {}, replace)


def build_shared_tensor(folder: Path) -> Path:
    """One 1-float storage viewed as 800 MB under 100 names: 80 GB once copied."""
    tensor = Tensor(Storage("0", 1), (200_000_000,), (0,))
    state = {f"w{index}": tensor for index in range(100)}
    return write_legacy(folder / "shared-tensor.pth", state, FLOAT)


def build_build_changes_tensor(folder: Path) -> Path:
    """A checked 1-float tensor that BUILD then reshapes to a 4 TiB stride-0 view."""
    state = {
        "w": Tensor(
            Storage("0", 1), (1,), (1,), state=(None, {"shape": (1 << 40,), "stride": (0,)})
        )
    }
    return write_legacy(folder / "build-tensor.pth", state, FLOAT)


def build_zip_member_size_lie(folder: Path) -> Path:
    """A stored member whose central-directory entry claims 2 GB in a 500-byte archive."""
    path = write_zip(folder / "size-lie.pth", crafted(one_float((1,), (1,)), False), {"0": b"abcd"})
    content, name = bytearray(path.read_bytes()), b"archive/data/0"
    entries = [found.start() for found in re.finditer(b"PK\x01\x02", content)]
    entry = next(at for at in entries if content[at + 46 : at + 46 + len(name)] == name)
    struct.pack_into("<II", content, entry + 20, 0x7FFFFFFF, 0x7FFFFFFF)  # compressed, size
    path.write_bytes(bytes(content))
    return path


def build_many_members(folder: Path, count: int = 70_000) -> Path:
    """A zip of ``count`` empty members (over 65 535: the zip64 end record counts them)."""
    path = write_zip(folder / "many-members.pth", crafted(one_float((1,), (1,)), False), FLOAT_DATA)
    with zipfile.ZipFile(path, "a") as archive:
        for index in range(count):
            archive.writestr(f"archive/extra/{index}", b"")
    return path


BOMBS = {
    "legacy magic-number pickle runs os.system": build_legacy_magic_payload,
    "legacy storage-key pickle runs os.system": build_legacy_keys_payload,
    "zip data.pkl runs os.system": build_zip_pickle_payload,
    "stride 0: 1 float as 2 GiB (torch.save)": build_stride_zero,
    "zip member inflating to 600 MB": build_zip_deflate_bomb,
    "shape of 4 TiB on 1 float": build_zip_shape_4tb,
    "legacy data count of 2**40": build_legacy_count_2_40,
    "storage id of 2**40 elements": build_legacy_storage_2_40,
    "persistent id of 2**40 shared leaves": build_exponential_pid,
    "dict key hashing 2**64 shared leaves": build_hash_bomb,
    "memo index 2**31": build_memo_index,
    "pickle declaring 1 TiB of bytes": build_bytes_length,
    "one 800 MB view under 100 names": build_shared_tensor,
    "BUILD reshapes a checked tensor": build_build_changes_tensor,
    "zip member claiming 2 GB in 500 bytes": build_zip_member_size_lie,
}

# --- Reading in a child process, under a memory limit. ---

CHILD = r"""
import importlib.util, json, os, sys

source = os.environ.get("TORCH_PICKLE_SOURCE")
if source:
    spec = importlib.util.spec_from_file_location("torch_pickle_under_test", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
else:
    from braintumor.model.weights import torch_pickle as module
limits = json.loads(os.environ.get("TORCH_PICKLE_LIMITS") or "null")
try:
    if limits:
        state = module.load_state_dict(sys.argv[1], module.ReadLimits(**limits))
    else:
        state = module.load_state_dict(sys.argv[1])
    status, message = "read", f"{len(state)} tensors"
except module.TorchFileError as error:
    status, message = "refused", str(error)
except BaseException as error:
    status, message = "crashed", f"{type(error).__name__}: {str(error)[:200]}"
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count the forked
# copy of the parent (pytest with torch loaded: 470 MB) as this reader's memory.
status_lines = open("/proc/self/status").read().splitlines()
peak_kb = int(next(line for line in status_lines if line.startswith("VmHWM")).split()[1])
print(json.dumps({"status": status, "message": message, "peak_mb": peak_kb / 1024}))
"""


@dataclass(frozen=True)
class Outcome:
    """What a child reading one file reported: read, refused, crashed, died or timeout."""

    status: str
    message: str
    peak_mb: float


def read_in_child(
    path: Path,
    memory: int | None = CHILD_MEMORY,
    timeout: float = 60,
    limits: dict[str, int] | None = None,
    source: str | None = None,
) -> Outcome:
    """``load_state_dict(path)`` in a fresh interpreter whose address space is capped at
    ``memory`` bytes (None: no cap), so that a bomb that gets through fails the test
    instead of exhausting the machine. ``source``: another version of the module (by
    default ``TORCH_PICKLE_SOURCE`` from the environment, else the installed one)."""

    def cap_memory() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    environment["TORCH_PICKLE_LIMITS"] = json.dumps(limits or {})
    if source is not None:
        environment["TORCH_PICKLE_SOURCE"] = source
    command = [sys.executable, "-c", CHILD, str(path)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            preexec_fn=cap_memory,
        )
    except subprocess.TimeoutExpired:
        return Outcome("timeout", f"still running after {timeout:.0f} s", math.nan)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return Outcome("died", f"exit {done.returncode}: {done.stderr[-300:]}", math.nan)
    return Outcome(**json.loads(lines[-1]))


def assert_refused(outcome: Outcome, path: Path, phrase: str, peak_mb: float = 200) -> None:
    """Refused with one line that names the file and ``phrase``, having allocated little."""
    assert outcome.status == "refused", outcome
    assert "\n" not in outcome.message and str(path) in outcome.message, outcome
    assert phrase in outcome.message, outcome
    assert outcome.peak_mb < peak_mb, outcome


@pytest.mark.parametrize(
    ("build", "marker"),
    [
        (build_legacy_magic_payload, "pwned-magic"),
        (build_legacy_keys_payload, "pwned-keys"),
        (build_zip_pickle_payload, "pwned-zip"),
    ],
    ids=["legacy-magic-pickle", "legacy-storage-key-pickle", "zip-data-pkl"],
)
def test_a_pickle_that_would_run_code_runs_nothing(tmp_path: Path, build: Any, marker: str) -> None:
    path = build(tmp_path)
    outcome = read_in_child(path)
    assert not (tmp_path / marker).exists(), "the file's code ran"
    assert_refused(outcome, path, "refuses the global posix.system")


def test_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """The same payload in the object pickle, in this process (no child to hide it)."""
    path = tmp_path / "evil.pth"
    with path.open("wb") as stream:
        for header in (LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, stream)
        pickle.dump({"w": Payload(tmp_path / "pwned")}, stream)
    with pytest.raises(TorchFileError, match="refuses the global .*system"):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_a_stride_zero_view_is_not_expanded_past_the_budget(tmp_path: Path) -> None:
    path = build_stride_zero(tmp_path)
    assert path.stat().st_size < 400
    assert_refused(read_in_child(path), path, "over the per-tensor budget")


def test_a_zip_member_cannot_declare_more_than_the_archive_holds(tmp_path: Path) -> None:
    path = build_zip_deflate_bomb(tmp_path)
    assert path.stat().st_size < 4_000_000
    assert_refused(read_in_child(path), path, "but the file has")


def test_a_shape_of_4_tib_is_refused(tmp_path: Path) -> None:
    path = build_zip_shape_4tb(tmp_path)
    assert_refused(read_in_child(path), path, "would take 4398046511104 bytes")


@pytest.mark.parametrize(
    "build",
    [build_legacy_count_2_40, build_legacy_storage_2_40],
    ids=["in-the-data-section", "in-the-storage-id"],
)
def test_an_element_count_of_2_40_is_refused(tmp_path: Path, build: Any) -> None:
    path = build(tmp_path)
    outcome = read_in_child(path)
    assert_refused(outcome, path, "storage '0'")


def test_a_shared_reference_persistent_id_makes_a_short_message(tmp_path: Path) -> None:
    path = build_exponential_pid(tmp_path)
    outcome = read_in_child(path, timeout=30)
    assert_refused(outcome, path, "a persistent id that is not a storage")
    assert len(outcome.message) < len(str(path)) + 100


def test_a_dict_key_that_takes_exponential_time_to_hash_is_refused(tmp_path: Path) -> None:
    path = build_hash_bomb(tmp_path)
    assert_refused(read_in_child(path, timeout=30), path, "dict keys are not strings or numbers")


def test_a_huge_memo_index_is_refused(tmp_path: Path) -> None:
    path = build_memo_index(tmp_path)
    assert_refused(read_in_child(path), path, "memo index (2147483647) out of range")


def test_a_pickle_cannot_declare_more_bytes_than_the_file_has(tmp_path: Path) -> None:
    path = build_bytes_length(tmp_path)
    assert_refused(read_in_child(path), path, "truncated or malformed pickle")


def test_every_returned_copy_counts_against_the_total_budget(tmp_path: Path) -> None:
    path = build_shared_tensor(tmp_path)
    assert_refused(read_in_child(path), path, "over the budget of")


def test_build_cannot_change_a_checked_tensor(tmp_path: Path) -> None:
    path = build_build_changes_tensor(tmp_path)
    assert_refused(read_in_child(path), path, "changes the state of an object")


def test_a_zip_member_cannot_claim_more_than_the_archive_holds(tmp_path: Path) -> None:
    path = build_zip_member_size_lie(tmp_path)
    assert_refused(read_in_child(path), path, "declares sizes the")


def test_compressed_tensor_data_is_refused(tmp_path: Path) -> None:
    """torch.save stores tensors uncompressed; a deflated one could inflate past its size."""
    noise = np.random.default_rng(0).random(1000, dtype=np.float32).tobytes()
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        state = {"w": Tensor(Storage("0", 1000), (1000,), (1,))}
        archive.writestr("archive/data.pkl", crafted(state, legacy=False))
        archive.writestr("archive/data/0", noise)
    assert_refused(read_in_child(path), path, "storage '0' is compressed")


@pytest.mark.parametrize(("count", "limit"), [(100, 50), (70_000, 60_000)], ids=["zip", "zip64"])
def test_a_zip_of_too_many_members_is_refused(tmp_path: Path, count: int, limit: int) -> None:
    path = build_many_members(tmp_path, count)
    outcome = read_in_child(path, limits={"zip_members": limit})
    assert_refused(outcome, path, f"a zip file of {count + 3} members, over {limit}")


def test_the_budgets_are_parameters(tmp_path: Path) -> None:
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(1000), "b": torch.ones(10)}, path)
    assert read_in_child(path).status == "read"
    cases = {
        "total_bytes": (6000, "over the budget of 6000"),
        "tensor_bytes": (1000, "over the per-tensor budget of 1000"),
        "pickle_opcodes": (20, "more than 20 opcodes"),
        "pickle_bytes": (100, "a data.pkl of"),
    }
    for limit, (value, phrase) in cases.items():
        assert_refused(read_in_child(path, limits={limit: value}), path, phrase)
    torch.save({"w": torch.ones(10)}, path, _use_new_zipfile_serialization=False)
    outcome = read_in_child(path, limits={"pickle_bytes": 100})
    assert_refused(outcome, path, "a pickle longer than 100 bytes")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kept", [0.0, 0.05, 0.3, 0.6, 0.95])
def test_a_truncated_file_is_one_line(tmp_path: Path, zip_format: bool, kept: float) -> None:
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=zip_format)
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * kept)])
    with pytest.raises(TorchFileError) as error:
        load_state_dict(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_the_end_of_the_data_is_named(tmp_path: Path) -> None:
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TorchFileError, match="ends inside"):
        load_state_dict(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", b"PK\x03\x04 broken zip" * 8],
    ids=["empty", "text", "broken-zip"],
)
def test_garbage_is_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(TorchFileError) as error:
        load_state_dict(path)
    assert "\n" not in str(error.value)


def test_something_other_than_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchFileError, match="not a state dict"):
        load_state_dict(path)
