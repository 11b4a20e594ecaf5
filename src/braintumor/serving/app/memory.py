"""Keep the app's resident memory level under load: fewer glibc malloc arenas.

glibc gives each thread that allocates its own malloc arena (up to eight per core) and
keeps what each arena held at its busiest. Gradio runs every analysis in a worker thread
of a pool whose threads come and go, so under load new arenas kept appearing, each
keeping about 13 MB: the app's memory climbed for minutes (``bench/app_load.py``, 50
clients: +40 to +140 MB in a 30 s round after four rounds). Two arenas, as
``MALLOC_ARENA_MAX=2`` would set, level it off at little cost to an app that runs one
analysis at a time.
"""

from __future__ import annotations

import ctypes
import os

ARENA_ENV = "MALLOC_ARENA_MAX"
M_ARENA_MAX = -8  # glibc's mallopt parameter number
DEFAULT_ARENAS = 2


def limit_malloc_arenas(count: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count`` for the threads started from now on (call it
    before the model and the server start theirs). Leaves alone a value set through
    ``$MALLOC_ARENA_MAX``; does nothing where malloc is not glibc's (musl, macOS).
    Returns whether the cap was set."""
    if os.environ.get(ARENA_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))
