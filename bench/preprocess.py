"""Benchmark the preprocess stage against a plain serial loop: throughput and peak memory.

Usage (from the repository root)::

    .venv/bin/python bench/preprocess.py [--limit N] [--workers W] [--repeat R] [--mirror DIR]

On the real images of the data mirror (all of msoud and sartaj unless ``--limit``),
with the quickstart profile's parameters (224 x 224), it measures in one run:

- ``baseline``: a plain serial loop of the same transform (``decode_image`` then
  ``preprocess_gray`` per file, results appended to a list, then ``np.stack``);
- ``stage``: the stage's own code path, ``braintumor.data.preprocessing.write_split_arrays`` fed
  by a spawn ``Pool`` of W workers with the stage's initializer, created under the same
  condition as ``preprocess.preprocess`` creates it, streaming into a ``.npy`` in a
  temporary folder.

Each variant runs in a fresh subprocess so their memory peaks do not mix. While it runs,
this process samples the resident memory of the subprocess and all its children (the
pool's workers) every few milliseconds and keeps the peak of their sum, both in total and
anonymous (total minus file-backed pages: what the processes really hold, as opposed to
shared libraries and the page cache of a memory-mapped output file). The subprocess also
reports ``getrusage`` peaks (its own, and the largest of its waited-for children). Both
main processes import the same modules before the work starts; the stage's workers pay
their own imports (they unpickle ``braintumor.data.workers.transform_file``), which is part
of the stage's cost, so the timed section includes the pool's start-up.

Wall time on a shared machine depends on what else runs: ``--repeat R`` alternates the
variants R times and keeps each one's best time, and the CPU time (user + system of the
process and its workers) is printed beside it, as it depends much less on other load.

The reference is the decoded size of every input plus the output array (sum of H x W of
the decoded inputs + N x size x size bytes): the baseline holds every output (twice, while
stacking), the stage should stay well under it whatever N is.

Not a test: numbers depend on the machine and its load (printed with the results).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("msoud", "sartaj")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MEBIBYTE = 1 << 20


def default_mirror() -> Path:
    """The team's data mirror: ``BRAINTUMOR_MIRROR`` or ``../shared/datasets``."""
    configured = os.environ.get("BRAINTUMOR_MIRROR")
    return Path(configured) if configured else REPO.parent / "shared" / "datasets"


def quickstart_params() -> Any:
    """``params.yaml`` with the quickstart profile applied (what ``make run`` uses)."""
    from braintumor.core.config import params_from_mapping

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["profile"] = "quickstart"
    return params_from_mapping(raw, REPO / "profiles")


def list_images(mirror: Path, limit: int | None, seed: int) -> list[Path]:
    """Image files of every source, hidden folders excluded (as the clean stage skips
    them); with ``limit``, a seeded sample of that many, kept in path order."""
    paths: list[Path] = []
    for source in SOURCES:
        root = mirror / source
        if not root.is_dir():
            raise SystemExit(f"error: {root}: source not found (set BRAINTUMOR_MIRROR)")
        paths.extend(
            path
            for path in root.rglob("*")
            if path.is_file()
            and path.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
    paths.sort()
    if limit is not None and limit < len(paths):
        chosen = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    return paths


def warm_cache(paths: list[Path]) -> tuple[int, int]:
    """Read every file once (so both variants read from the page cache); returns the
    bytes read and the decoded size in pixels (sum of width x height from the headers)."""
    total_bytes = total_pixels = 0
    for path in paths:
        data = path.read_bytes()
        total_bytes += len(data)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        total_pixels += width * height
    return total_bytes, total_pixels


# --------------------------------------------------------------------------- the variants


def _digest_array(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _digest_npy(path: Path) -> str:
    """SHA-256 of a ``.npy`` file's data, read in chunks (mapping it would add the whole
    array to this process's resident memory and spoil the measurement)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(handle)
        else:
            np.lib.format.read_array_header_2_0(handle)
        while chunk := handle.read(16 * MEBIBYTE):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_baseline(paths: list[str], params: Any) -> dict[str, Any]:
    """A plain serial loop: decode, transform, append to a list, stack at the end."""
    from braintumor.data.imaging import decode_image, preprocess_gray

    size = params.common.image_size
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    images = []
    for path in paths:
        gray = decode_image(Path(path).read_bytes(), name=path).gray
        images.append(preprocess_gray(gray, size, params.preprocess))
    stacked = np.stack(images)[..., np.newaxis]  # the stage's (N, size, size, 1) layout
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    del images
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "digest": _digest_array(stacked),
        "shape": list(stacked.shape),
    }


def run_stage(paths: list[str], params: Any, workers: int, folder: Path) -> dict[str, Any]:
    """The stage's code path: a spawn pool (as ``preprocess.preprocess`` creates it) and
    ``write_split_arrays`` streaming into a ``.npy`` file."""
    from braintumor.data.preprocessing import write_split_arrays
    from braintumor.data.workers import init_worker

    destination = folder / "images.npy"
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    pool = (
        multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker)
        if workers > 1 and len(paths) > params.preprocess.chunk_size
        else None
    )
    try:
        write_split_arrays(
            paths,
            destination,
            params.common.image_size,
            params.preprocess,
            pool,
            False,
            "bench",
        )
    finally:
        if pool is not None:
            pool.close()
            pool.join()  # after this the workers' CPU time is in RUSAGE_CHILDREN
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    shape = list(np.load(destination, mmap_mode="r").shape)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "digest": _digest_npy(destination),
        "shape": shape,
        "pool": pool is not None,
    }


def child_main(variant: str, paths_file: Path, workers: int, folder: Path) -> None:
    """Run one variant in this (fresh) process and print its result as one JSON line."""
    import cv2

    import braintumor.data.preprocessing  # noqa: F401 (both variants pay the same imports)

    paths = json.loads(paths_file.read_text(encoding="utf-8"))
    params = quickstart_params()
    before = psutil.Process().memory_info()
    if variant == "baseline":
        result = run_baseline(paths, params)
    else:
        result = run_stage(paths, params, workers, folder)
    result.update(
        rss_before_work=before.rss,
        anon_before_work=before.rss - before.shared,
        maxrss_self=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        maxrss_children=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        opencv_threads=cv2.getNumThreads(),
    )
    print(json.dumps(result))


# --------------------------------------------------------------------------- measuring


class TreeMemorySampler(threading.Thread):
    """Samples the summed resident memory of a process and all its descendants.

    Reading one process's memory is cheap (``/proc/<pid>/statm``); listing descendants
    scans every process on the machine (a few ms of CPU), so the list is refreshed less
    often than the memory is read, or the sampler would steal a core from what it measures.
    """

    def __init__(
        self, pid: int, interval_s: float = 0.005, refresh_processes_s: float = 0.1
    ) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.refresh_processes_s = refresh_processes_s
        self.peak_total = 0
        self.peak_anonymous = 0
        self.most_processes = 0
        self.samples = 0
        self._finished = threading.Event()

    def run(self) -> None:
        processes = [self.root]
        refreshed = 0.0
        while not self._finished.is_set():
            now = time.monotonic()
            if now - refreshed >= self.refresh_processes_s:
                try:
                    processes = [self.root, *self.root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return
                refreshed = now
            total = anonymous = 0
            for process in processes:
                try:
                    memory = process.memory_info()
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
                total += memory.rss
                anonymous += memory.rss - memory.shared
            self.peak_total = max(self.peak_total, total)
            self.peak_anonymous = max(self.peak_anonymous, anonymous)
            self.most_processes = max(self.most_processes, len(processes))
            self.samples += 1
            self._finished.wait(self.interval_s)

    def stop(self) -> None:
        self._finished.set()
        self.join()


def measure(variant: str, paths_file: Path, workers: int, folder: Path) -> dict[str, Any]:
    """Run ``variant`` in a fresh subprocess while sampling its process tree's memory."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--paths-file",
        str(paths_file),
        "--workers",
        str(workers),
        "--folder",
        str(folder),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    sampler = TreeMemorySampler(process.pid)
    sampler.start()
    output, _ = process.communicate()
    sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"error: the {variant} run failed (exit status {process.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(
        peak_tree_total=sampler.peak_total,
        peak_tree_anonymous=sampler.peak_anonymous,
        processes=sampler.most_processes,
        samples=sampler.samples,
    )
    return result


def _megabytes(value: float) -> str:
    return f"{value / MEBIBYTE:,.0f} MB"


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the best time (the least disturbed by other load on a
    shared machine) and the highest memory peaks."""
    best = dict(min(runs, key=lambda run: run["seconds"]))
    best["cpu_seconds"] = min(run["cpu_seconds"] for run in runs)
    for key in ("peak_tree_total", "peak_tree_anonymous", "maxrss_self", "maxrss_children"):
        best[key] = max(run[key] for run in runs)
    best["all_seconds"] = [run["seconds"] for run in runs]
    best["digests"] = {run["digest"] for run in runs}
    return best


def report(
    command: str,
    paths: list[Path],
    mirror: Path,
    workers: int,
    size: int,
    inputs_bytes: int,
    input_pixels: int,
    results: dict[str, dict[str, Any]],
) -> None:
    count = len(paths)
    sources = ", ".join(
        f"{source} {sum(1 for p in paths if p.relative_to(mirror).parts[0] == source)}"
        for source in SOURCES
    )
    outputs = count * size * size
    reference = input_pixels + outputs
    baseline, stage = results["baseline"], results["stage"]
    labels = {"baseline": "baseline (serial loop)", "stage": f"stage ({workers} worker(s))"}
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print()
    print(f"preprocess benchmark: {count} images ({sources}) -> {size} x {size}, quickstart")
    print(f"command: {command}")
    print(
        f"machine: {len(os.sched_getaffinity(0))} usable CPUs, load average {load} (after); "
        f"stage: {workers} worker(s), "
        f"{'a spawn pool' if stage['pool'] else 'no pool: serial, as the stage then runs'}; "
        f"baseline: OpenCV threads {baseline['opencv_threads']}"
    )
    print(f"inputs: {_megabytes(inputs_bytes)} of files, read once first to warm the page cache")

    print()
    header = (
        f"{'speed':<24}{'runs':>5}{'seconds':>9}{'images/s':>10}{'CPU s':>8}{'CPU ms/img':>12}"
        "   seconds of every run"
    )
    print(header)
    print("-" * len(header))
    for name in ("baseline", "stage"):
        row = results[name]
        every = ", ".join(f"{value:.2f}" for value in row["all_seconds"])
        print(
            f"{labels[name]:<24}{len(row['all_seconds']):>5}{row['seconds']:>9.2f}"
            f"{count / row['seconds']:>10.1f}{row['cpu_seconds']:>8.1f}"
            f"{1000 * row['cpu_seconds'] / count:>12.2f}   {every}"
        )
    print(
        f"{'stage / baseline':<24}{'':>5}{'':>9}{baseline['seconds'] / stage['seconds']:>9.2f}x"
        f"{stage['cpu_seconds'] / baseline['cpu_seconds']:>7.2f}x"
    )

    print()
    header = (
        f"{'peak memory':<24}{'tree RSS':>10}{'tree anon':>11}{'growth':>9}{'at rest':>9}"
        f"{'maxrss main':>13}{'maxrss child':>14}{'procs':>7}"
    )
    print(header)
    print("-" * len(header))
    for name in ("baseline", "stage"):
        row = results[name]
        growth = row["peak_tree_anonymous"] - row["anon_before_work"]
        child = _megabytes(row["maxrss_children"]) if row["maxrss_children"] else "-"
        print(
            f"{labels[name]:<24}{_megabytes(row['peak_tree_total']):>10}"
            f"{_megabytes(row['peak_tree_anonymous']):>11}{_megabytes(growth):>9}"
            f"{_megabytes(row['anon_before_work']):>9}{_megabytes(row['maxrss_self']):>13}"
            f"{child:>14}{row['processes']:>7}"
        )
    print(
        f"{'stage / baseline':<24}"
        f"{stage['peak_tree_total'] / baseline['peak_tree_total']:>9.2f}x"
        f"{stage['peak_tree_anonymous'] / baseline['peak_tree_anonymous']:>10.2f}x"
    )
    print(
        f"reference, decoded inputs + outputs: {_megabytes(input_pixels)} + "
        f"{_megabytes(outputs)} = {_megabytes(reference)}; peak tree anon / reference: "
        f"baseline {baseline['peak_tree_anonymous'] / reference:.0%}, "
        f"stage {stage['peak_tree_anonymous'] / reference:.0%}"
    )
    print(
        "  tree RSS / anon: summed over the process and its children, sampled every 5 ms;\n"
        "  anon = RSS minus file-backed pages (shared libraries, and for the stage the\n"
        "  written pages of its memory-mapped output, page cache the kernel can drop);\n"
        "  growth = tree anon peak minus the main process's anon at rest before the work\n"
        "  (for the stage it includes the workers' own imports); maxrss = getrusage peaks\n"
        "  (main process; largest waited-for child)."
    )
    digests = baseline["digests"] | stage["digests"]
    same = len(digests) == 1 and baseline["shape"] == stage["shape"]
    print(
        f"outputs identical across variants and runs: {'yes' if same else 'NO'} "
        f"(shape {tuple(stage['shape'])}, sha256 {stage['digest'][:16]}...)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="a seeded sample of this many images")
    parser.add_argument("--workers", type=int, help="stage workers (default: params, 0 = all)")
    parser.add_argument("--mirror", type=Path, default=None, help="the data mirror folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each variant, alternating (best time)"
    )
    parser.add_argument("--child", choices=("baseline", "stage"), help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        child_main(args.child, args.paths_file, args.workers, args.folder)
        return 0

    from braintumor.core.files import worker_count

    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    params = quickstart_params()
    workers = worker_count(params.preprocess.workers if args.workers is None else args.workers)
    mirror = (args.mirror or default_mirror()).resolve()
    command = shlex.join([sys.executable, *sys.argv])
    paths = list_images(mirror, args.limit, args.seed)
    if not paths:
        raise SystemExit(f"error: no images under {mirror}")
    print(f"warming the page cache with {len(paths)} files...", file=sys.stderr)
    inputs_bytes, input_pixels = warm_cache(paths)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "stage": []}
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as temporary:
        folder = Path(temporary)
        paths_file = folder / "paths.json"
        paths_file.write_text(json.dumps([str(p) for p in paths]), encoding="utf-8")
        for repeat in range(args.repeat):
            for variant in ("baseline", "stage"):
                print(f"running {variant} ({repeat + 1}/{args.repeat})...", file=sys.stderr)
                runs[variant].append(measure(variant, paths_file, workers, folder))
    results = {variant: combine(variant_runs) for variant, variant_runs in runs.items()}
    report(
        command,
        paths,
        mirror,
        workers,
        params.common.image_size,
        inputs_bytes,
        input_pixels,
        results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
