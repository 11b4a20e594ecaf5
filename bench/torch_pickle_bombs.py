"""Peak memory and outcome of ``torch_pickle.load_state_dict`` on hostile ``.pth`` files.

    .venv/bin/python bench/torch_pickle_bombs.py                       # this tree
    .venv/bin/python bench/torch_pickle_bombs.py --source /tmp/old.py  # another version

Each file is built in a temporary folder by the ``build_`` functions of
``tests/unit/model/test_torch_pickle.py`` (the tests read the same files) and read in a
fresh interpreter whose address space is capped (``--memory-gib``, so that a version
that lets a bomb through shows "crashed: MemoryError" instead of exhausting the machine)
and whose run is cut at ``--timeout`` seconds. The peak is the child's ``VmHWM``: its
``ru_maxrss`` would also count the forked copy of this process (torch is loaded here).
The baseline is the same child reading the real packaged ImageNet file, so ``extra`` is
(``vs real``) is what a bomb cost beyond reading a real 18.8 MB state dict. ``--source`` reads with
another copy of the module, e.g.
``git show HEAD~1:src/braintumor/model/weights/torch_pickle.py > /tmp/old.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "unit" / "model"), str(REPO / "tests")]

import test_torch_pickle as hostile  # noqa: E402 - the builders the tests use

from braintumor.model.weights.convert import package_state_dict_path  # noqa: E402


def many_members(folder: Path) -> Path:
    """150 000 empty zip members: zipfile keeps an object per member (linear, not a bomb)."""
    return hostile.build_many_members(folder, 150_000)


def row(name: str, size: int, outcome: hostile.Outcome, baseline_mb: float) -> str:
    extra = outcome.peak_mb - baseline_mb
    message = outcome.message.split(": ", 1)[-1] if outcome.status == "refused" else outcome.message
    return (
        f"{name:40} {size:>11,} {outcome.peak_mb:8.1f} {extra:+9.1f}  {outcome.status}: "
        f"{message[:130]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="another copy of torch_pickle.py to measure")
    parser.add_argument("--memory-gib", type=float, default=3.0, help="address-space cap")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per file")
    arguments = parser.parse_args()
    memory = int(arguments.memory_gib * (1 << 30))
    source = str(Path(arguments.source).resolve()) if arguments.source else ""

    def read(path: Path) -> hostile.Outcome:
        return hostile.read_in_child(path, memory, arguments.timeout, source=source)

    real = package_state_dict_path()
    baseline = read(real)
    print(f"reader: {arguments.source or 'this tree'}; cap {arguments.memory_gib} GiB")
    print(f"{'file':40} {'bytes':>11} {'peak MB':>8} {'vs real':>9}  outcome")
    print(row("real packaged Lite0 state dict", real.stat().st_size, baseline, baseline.peak_mb))
    bombs = {**hostile.BOMBS, "150 000 zip members": many_members}
    with tempfile.TemporaryDirectory() as folder:
        for name, build in bombs.items():
            path = build(Path(folder))
            started = time.perf_counter()
            outcome = read(path)
            seconds = time.perf_counter() - started
            print(row(name, path.stat().st_size, outcome, baseline.peak_mb), f"({seconds:.1f} s)")
            ran = sorted(marker.name for marker in Path(folder).glob("pwned-*"))
            if ran:
                print(f"{'':40} the file's code ran: {', '.join(ran)} created")
                for marker in Path(folder).glob("pwned-*"):
                    marker.unlink()


if __name__ == "__main__":
    main()
