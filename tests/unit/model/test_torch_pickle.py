"""The torch-free reader of PyTorch state dicts, checked against torch itself."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from braintumor.model.weights.convert import package_state_dict_path
from braintumor.model.weights.torch_pickle import LEGACY_MAGIC, TorchFileError, load_state_dict


def tensors() -> dict[str, torch.Tensor]:
    """Dtypes, a transposed (non-contiguous) tensor, a slice with a storage offset, an empty one."""
    return {
        "conv.weight": torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)),
        "transposed": torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2),
        "slice": torch.arange(10.0, dtype=torch.float64)[3:8],
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "steps": torch.tensor(7),
        "ints": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "mask": torch.tensor([True, False]),
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


class Payload:
    """Unpickling this would call os.system: the reader must refuse, not run it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch pwned",))


def test_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as stream:
        for header in (LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, stream)
        pickle.dump({"w": Payload()}, stream)
    with pytest.raises(TorchFileError, match="refuses the global .*system"):
        load_state_dict(path)
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


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


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TorchFileError, match="ends inside"):
        load_state_dict(path)


def test_something_other_than_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchFileError, match="not a state dict"):
        load_state_dict(path)
