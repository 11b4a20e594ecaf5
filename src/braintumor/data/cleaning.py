"""Merge sources into one vocabulary, validate, de-duplicate, find leakage.

Reads ``data/raw/<source>/<split folder>/<class folder>/...`` (never edits it) and writes:

- an index table (Parquet) with one row per file found: path, source, split, label, size,
  channels, hashes, duplicate group, status (``kept`` / ``dropped`` / ``skipped``), reason,
  normalisation notes, and for test images whether a training twin exists;
- ``metrics/data.json``: counts per class, split and source, dropped by reason, duplicate
  groups, test images with a training twin (by our detector and by the reference 16 x 16
  average hash), test counts per source, and the duplicates each pair of sources shares;
- a composition table (CSV, for DVC plots) and two figures (composition, duplicate pairs).

The science (scanning rules, per-file inspection, grouping, policy, counts) is in pure
functions; ``main`` only does I/O.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from braintumor.core.files import worker_count
from braintumor.core.schema import CleanParams, Params, SourceParams
from braintumor.data.hashing import connected_groups, pair_similarity, similar_pairs
from braintumor.data.workers import init_worker, inspect_file

SKIPPED_HIDDEN = "hidden"
SKIPPED_EXTENSION = "not_image_extension"
SKIPPED_LOOSE = "outside_class_folder"
DROPPED_DUPLICATE = "duplicate"
DROPPED_TEST_TWIN = "twin_of_test"
DROPPED_LABEL_CONFLICT = "label_conflict"

INDEX_COLUMNS = [
    "path",
    "source",
    "split",
    "label",
    "source_folder",
    "status",
    "reason",
    "notes",
    "bytes",
    "file_format",
    "width",
    "height",
    "channels",
    "bit_depth",
    "pixel_hash",
    "average_hash",
    "dup_group",
    "dup_group_size",
    "duplicate_of",
    "has_train_twin",
    "similar_to_train",
    "leakage_free",
    "neighbour_group",
]


class CleanError(ValueError):
    """The raw data cannot be merged (an unmapped folder, a missing source)."""


@dataclass(frozen=True)
class FoundFile:
    """A file under ``data/raw`` with what its location says about it."""

    path: str
    source: str
    split: str | None
    label: str | None
    source_folder: str | None
    skip_reason: str | None


def scan_source(
    raw_dir: Path, source: SourceParams, extensions: tuple[str, ...]
) -> list[FoundFile]:
    """List every file of one source and decide from its location what it is.

    Hidden folders and files are skipped, as are files whose extension is not an image's
    and files that sit outside a class folder. A folder that is neither a mapped split nor
    a mapped class is an error: silently ignoring it could drop a whole class.
    """
    root = raw_dir / source.name
    if not root.is_dir():
        raise CleanError(f"{root}: source {source.name!r} is missing; run the acquire stage")
    found: list[FoundFile] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(raw_dir).as_posix()
        parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in parts):
            found.append(FoundFile(relative, source.name, None, None, None, SKIPPED_HIDDEN))
            continue
        if len(parts) == 1:  # a README or licence next to the split folders
            found.append(FoundFile(relative, source.name, None, None, None, SKIPPED_LOOSE))
            continue
        if parts[0] not in source.splits:
            raise CleanError(
                f"{root / parts[0]}: folder {parts[0]!r} is not a mapped split of source "
                f"{source.name!r} (acquire.sources[].splits: {sorted(source.splits)})"
            )
        split = source.splits[parts[0]]
        if len(parts) == 2:
            found.append(FoundFile(relative, source.name, split, None, None, SKIPPED_LOOSE))
            continue
        folder = parts[1]
        if folder not in source.labels:
            raise CleanError(
                f"{root / parts[0] / folder}: class folder {folder!r} is not mapped for source "
                f"{source.name!r} (acquire.sources[].labels: {sorted(source.labels)})"
            )
        skip = None if path.suffix.lower() in extensions else SKIPPED_EXTENSION
        found.append(FoundFile(relative, source.name, split, source.labels[folder], folder, skip))
    return found


def inspect_files(
    raw_dir: Path, files: list[FoundFile], params: CleanParams, progress: bool = True
) -> list[dict[str, Any]]:
    """Inspect every non-skipped file, in parallel, in input order (deterministic)."""
    tasks = [(str(raw_dir / f.path), f.path, params) for f in files if f.skip_reason is None]
    workers = min(worker_count(params.workers), max(1, len(tasks)))
    bar = tqdm(total=len(tasks), desc="clean", unit="img", disable=not progress, file=sys.stderr)
    results = []
    if workers == 1:
        for task in tasks:
            results.append(inspect_file(task))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=init_worker) as pool:
            for record in pool.imap(inspect_file, tasks, chunksize=32):
                results.append(record)
                bar.update()
    bar.close()
    return results


def build_index(files: list[FoundFile], records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per found file, joining location facts with inspection results."""
    by_path = {r["path"]: r for r in records}
    rows = []
    for found in files:
        row: dict[str, Any] = {
            "path": found.path,
            "source": found.source,
            "split": found.split,
            "label": found.label,
            "source_folder": found.source_folder,
        }
        if found.skip_reason is not None:
            row.update(status="skipped", reason=found.skip_reason, notes="")
        else:
            row.update(by_path[found.path])
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("bytes", "width", "height", "channels", "bit_depth"):
        if column not in frame:
            frame[column] = np.nan
        frame[column] = frame[column].astype("Int64")
    for column in ("file_format", "pixel_hash", "average_hash", "notes", "reason"):
        if column not in frame:
            frame[column] = None
    if "signature" not in frame:
        frame["signature"] = None
    return frame


def find_duplicate_groups(
    frame: pd.DataFrame, near_similarity: float, leakage_similarity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duplicate groups among decodable images, plus leakage pairs.

    Returns (group id per row or -1, the near-duplicate pairs as row indices, and the
    looser leakage pairs as row indices). Exact duplicates (equal pixel hashes) are always
    joined, whatever the similarity threshold.
    """
    valid = np.flatnonzero((frame["status"] == "kept").to_numpy())
    groups = np.full(len(frame), -1, dtype=np.int64)
    if valid.size == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return groups, empty, empty
    signatures = np.stack(frame["signature"].iloc[valid].to_list())
    loose = similar_pairs(signatures, leakage_similarity)
    near = loose[pair_similarity(signatures, loose) >= near_similarity]
    hashes = frame["pixel_hash"].iloc[valid].to_numpy()
    first_of_hash: dict[str, int] = {}
    exact = []
    for position, value in enumerate(hashes):
        if value in first_of_hash:
            exact.append((first_of_hash[value], position))
        else:
            first_of_hash[value] = position
    joined = np.concatenate([near, np.asarray(exact, dtype=np.int64).reshape(-1, 2)])
    groups[valid] = connected_groups(valid.size, joined)
    return groups, valid[joined], valid[loose]


def _keeper_order(members: pd.DataFrame, source_rank: dict[str, int]) -> pd.DataFrame:
    """Members sorted best first: most pixels, then source order, then path."""
    pixels = (members["width"].astype("float64") * members["height"].astype("float64")).fillna(0)
    return members.assign(_pixels=-pixels, _rank=members["source"].map(source_rank)).sort_values(
        ["_pixels", "_rank", "path"]
    )


def apply_policy(
    frame: pd.DataFrame,
    groups: np.ndarray,
    leakage_pairs: np.ndarray,
    params: CleanParams,
    source_order: list[str],
) -> pd.DataFrame:
    """Decide which duplicates to keep and mark test images that leak, per ``params``.

    Order matters and is fixed: label conflicts first (a group that disagrees on the label
    is dropped whole, since we cannot tell which label is right), then training twins of
    test images, then one keeper per split.
    """
    frame = frame.copy()
    frame["dup_group"] = groups
    sizes = pd.Series(groups).map(pd.Series(groups[groups >= 0]).value_counts()).fillna(1)
    frame["dup_group_size"] = np.where(groups >= 0, sizes.to_numpy(), 0).astype(np.int64)
    frame["duplicate_of"] = ""
    frame["has_train_twin"] = False
    source_rank = {name: rank for rank, name in enumerate(source_order)}
    in_group = frame[(frame["dup_group"] >= 0) & (frame["dup_group_size"] > 1)]
    for _, members in in_group.groupby("dup_group", sort=True):
        splits = set(members["split"])
        if "test" in splits and "train" in splits:
            test_rows = members.index[members["split"] == "test"]
            frame.loc[test_rows, "has_train_twin"] = True
        if params.label_conflicts == "drop" and members["label"].nunique() > 1:
            frame.loc[members.index, ["status", "reason"]] = ["dropped", DROPPED_LABEL_CONFLICT]
            continue
        if params.test_twins == "drop_train" and "test" in splits and "train" in splits:
            train_rows = members.index[members["split"] == "train"]
            frame.loc[train_rows, ["status", "reason"]] = ["dropped", DROPPED_TEST_TWIN]
            frame.loc[train_rows, "duplicate_of"] = _keeper_order(
                members.loc[members["split"] == "test"], source_rank
            )["path"].iloc[0]
        if params.within_split == "keep_one":
            alive = members.loc[frame.loc[members.index, "status"] == "kept"]
            for _, same_split in alive.groupby("split"):
                ordered = _keeper_order(same_split, source_rank)
                losers = ordered.index[1:]
                frame.loc[losers, ["status", "reason"]] = ["dropped", DROPPED_DUPLICATE]
                frame.loc[losers, "duplicate_of"] = ordered["path"].iloc[0]
    split = frame["split"].to_numpy()
    similar = np.zeros(len(frame), dtype=bool)
    for i, j in leakage_pairs:
        if {split[i], split[j]} == {"train", "test"}:
            similar[i if split[i] == "test" else j] = True
    frame["similar_to_train"] = similar
    frame["leakage_free"] = (
        (frame["split"] == "test") & ~frame["has_train_twin"] & ~frame["similar_to_train"]
    )
    return frame


def reference_leakage(frame: pd.DataFrame) -> int:
    """Test images whose 16 x 16 average hash equals a training image's (the dataset
    notes' count, 419 on Msoud), for comparison with our detector."""
    valid = frame[frame["average_hash"].notna()]
    train_hashes = set(valid.loc[valid["split"] == "train", "average_hash"])
    return int(valid.loc[valid["split"] == "test", "average_hash"].isin(train_hashes).sum())


def test_counts_by_source(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per source: test images in, kept, kept and leakage-free, and with a training twin
    (from any source)."""
    test = frame[(frame["split"] == "test") & (frame["status"] != "skipped")]
    result = {}
    for source in dict.fromkeys(frame["source"]):
        rows = test[test["source"] == source]
        kept = rows[rows["status"] == "kept"]
        result[str(source)] = {
            "in": len(rows),
            "kept": len(kept),
            "kept_leakage_free": int(kept["leakage_free"].sum()),
            "with_train_twin": int(rows["has_train_twin"].sum()),
        }
    return result


def cross_source_counts(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Duplicates shared by each pair of sources, keyed ``"<first>_vs_<second>"`` in source
    order (a group joins the images of all its sources, so it counts for every pair):

    - ``groups``: duplicate groups with members from both sources, and ``images``: the
      members of each source in them (whatever became of them);
    - ``test_with_train_twin``: per source, its test images whose group holds a training
      image of the other source (the twin that leaks across sources);
    - ``test_test_groups``: groups holding test images of both sources (one test image
      counted twice in a merged test set);
    - ``label_conflict_groups``: spanning groups whose members disagree on the label.
    """
    sources = list(dict.fromkeys(frame["source"]))
    grouped = frame[frame["dup_group_size"] > 1]
    presence = (
        grouped.groupby(["dup_group", "source", "split"])
        .size()
        .unstack(["source", "split"])
        .notna()
    )
    label_count = grouped.groupby("dup_group")["label"].nunique()

    def holds(source: str, split: str | None = None) -> pd.Series:
        columns = [c for c in presence.columns if c[0] == source and split in (None, c[1])]
        if not columns:
            return pd.Series(False, index=presence.index)
        return presence[columns].any(axis=1)

    def test_twins(test_source: str, train_source: str) -> int:
        leaking = presence.index[holds(test_source, "test") & holds(train_source, "train")]
        rows = grouped[(grouped["source"] == test_source) & (grouped["split"] == "test")]
        return int(rows["dup_group"].isin(leaking).sum())

    result = {}
    for position, first in enumerate(sources):
        for second in sources[position + 1 :]:
            spanning = presence.index[holds(first) & holds(second)]
            members = grouped[grouped["dup_group"].isin(spanning)]
            test_test = holds(first, "test") & holds(second, "test")
            result[f"{first}_vs_{second}"] = {
                "groups": len(spanning),
                "images": {
                    name: int((members["source"] == name).sum()) for name in (first, second)
                },
                "test_with_train_twin": {
                    first: test_twins(first, second),
                    second: test_twins(second, first),
                },
                "test_test_groups": int(test_test.sum()),
                "label_conflict_groups": int((label_count.loc[spanning] > 1).sum()),
            }
    return result


def summarise(frame: pd.DataFrame, near_pairs: np.ndarray) -> dict[str, Any]:
    """The numbers of ``metrics/data.json``: what came in, what was kept and why not."""
    kept = frame[frame["status"] == "kept"]
    images = frame[frame["status"] != "skipped"]
    notes = Counter(note for text in kept["notes"].fillna("") for note in text.split("; ") if note)
    return {
        "files_in": len(frame),
        "images_in": len(images),
        "kept": len(kept),
        "skipped": _reason_counts(frame, "skipped"),
        "dropped": _reason_counts(frame, "dropped"),
        "normalised": dict(sorted(notes.items())),
        "kept_by_split_label": _nested_counts(kept, ["split", "label"]),
        "kept_by_source_split": _nested_counts(kept, ["source", "split"]),
        "in_by_source_split": _nested_counts(images, ["source", "split"]),
        "duplicates": _duplicate_counts(frame, near_pairs),
        "leakage": _leakage_counts(frame),
        "cross_source": cross_source_counts(frame),
    }


def _reason_counts(frame: pd.DataFrame, status: str) -> dict[str, int]:
    """How many files have ``status``, per reason (most frequent first)."""
    reasons = frame.loc[frame["status"] == status, "reason"].value_counts()
    return {str(k): int(v) for k, v in reasons.items()}


def _nested_counts(data: pd.DataFrame, keys: list[str]) -> dict[str, Any]:
    """Row counts per combination of ``keys``, nested one level per key (JSON-friendly,
    unlike a MultiIndex): ``{split: {label: count}}`` for two keys."""
    result: dict[str, Any] = {}
    for values, count in data.groupby(keys).size().items():
        values = values if isinstance(values, tuple) else (values,)
        node = result
        for value in values[:-1]:
            node = node.setdefault(str(value), {})
        node[str(values[-1])] = int(count)
    return result


def _duplicate_counts(frame: pd.DataFrame, near_pairs: np.ndarray) -> dict[str, int]:
    """How much duplication there is, and how much of it crosses a source, a split or a
    label (a label conflict means the same image is labelled two ways)."""
    grouped = frame[frame["dup_group_size"] > 1]
    group_facts = grouped.groupby("dup_group").agg(
        sources=("source", "nunique"), splits=("split", "nunique"), labels=("label", "nunique")
    )
    exact_groups = frame[frame["pixel_hash"].notna()].groupby("pixel_hash").size()
    return {
        "groups": len(group_facts),
        "images_in_groups": int(len(grouped)),
        "extra_copies": int(len(grouped) - len(group_facts)),
        "exact_groups": int((exact_groups > 1).sum()),
        "near_pairs": int(len(near_pairs)),
        "cross_source_groups": int((group_facts["sources"] > 1).sum()),
        "cross_split_groups": int((group_facts["splits"] > 1).sum()),
        "label_conflict_groups": int((group_facts["labels"] > 1).sum()),
    }


def _leakage_counts(frame: pd.DataFrame) -> dict[str, Any]:
    """How many test images have a twin (or a look-alike) in training, before and after
    cleaning: the leakage that would inflate test scores."""
    test = frame[frame["split"] == "test"]
    kept = frame[frame["status"] == "kept"]
    kept_test = kept[kept["split"] == "test"]
    return {
        "test_images": int(test["status"].ne("skipped").sum()),
        "test_with_train_twin": int(test["has_train_twin"].sum()),
        "test_with_train_twin_average_hash": reference_leakage(frame),
        "test_similar_to_train": int((test["similar_to_train"] & ~test["has_train_twin"]).sum()),
        "kept_test_leakage_free": int(kept_test["leakage_free"].sum()),
        "kept_test_not_leakage_free": int((~kept_test["leakage_free"]).sum()),
        "by_source": test_counts_by_source(frame),
    }


def composition_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Kept images per split, source and label (the DVC bar plot's data)."""
    kept = frame[frame["status"] == "kept"]
    table = kept.groupby(["split", "source", "label"]).size().rename("count").reset_index()
    table["group"] = table["split"] + "/" + table["source"]
    return table


@dataclass(frozen=True)
class CleanResult:
    """The stage's result: the index (with signatures), its metrics, the duplicate pairs."""

    frame: pd.DataFrame
    metrics: dict[str, Any]
    near_pairs: np.ndarray


def clean(raw_dir: Path, params: Params, progress: bool = True) -> CleanResult:
    """Run the whole stage in memory: scan, inspect, group, apply policy, summarise."""
    files: list[FoundFile] = []
    for source in params.acquire.sources:
        files.extend(scan_source(raw_dir, source, params.clean.image_extensions))
    records = inspect_files(raw_dir, files, params.clean, progress=progress)
    frame = build_index(files, records)
    groups, near, leakage = find_duplicate_groups(
        frame, params.clean.near_similarity, params.clean.leakage_similarity
    )
    source_order = [s.name for s in params.acquire.sources]
    frame = apply_policy(frame, groups, leakage, params.clean, source_order)
    # Images joined by leakage-level similarity (same-patient neighbours, duplicates
    # included): preprocess keeps each group on one side of the validation split.
    frame["neighbour_group"] = connected_groups(len(frame), leakage)
    return CleanResult(frame, summarise(frame, near), near)
