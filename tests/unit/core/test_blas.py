"""``single_thread_blas``: NumPy's BLAS (loaded before) and SciPy's (loaded after) both end
at one thread; an explicit ``OPENBLAS_NUM_THREADS`` is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, numpy
from braintumor.core.blas import single_thread_blas
single_thread_blas()
import scipy.linalg
from threadpoolctl import threadpool_info
print(json.dumps([(i["filepath"].rsplit("/", 1)[-1], i["num_threads"])
                  for i in threadpool_info() if i["user_api"] == "blas"]))
"""


def blas_threads(setting: str | None) -> list[tuple[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    if setting is not None:
        env["OPENBLAS_NUM_THREADS"] = setting
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return [tuple(item) for item in json.loads(done.stdout)]


def test_numpy_and_scipy_blas_get_one_thread() -> None:
    found = blas_threads(None)
    names = [name for name, _ in found]
    assert any("numpy" in n or "scipy_openblas64" in n for n in names), found
    assert len(found) >= 2, found  # NumPy's and SciPy's own OpenBLAS
    assert all(threads == 1 for _, threads in found), found


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 2 from 1")
def test_an_explicit_setting_is_kept() -> None:
    assert all(threads == 2 for _, threads in blas_threads("2"))
