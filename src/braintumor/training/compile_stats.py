"""How much of a training phase went into compiling: XLA compilations counted per program.

On a GPU the first epoch of a Keras-JAX phase holds every XLA compilation of the phase
(training step, evaluation step, and each one again for every other batch shape) and
XLA's autotuning of the convolutions inside them, so "the first epoch is slow" needs
numbers: which programs were compiled, how often, and for how long. ``CompileMeter``
listens to JAX's monitoring events while a phase runs and reports them; on the other
backends it reports nothing (TensorFlow and PyTorch do not publish these events), and
the per-epoch history still shows the first epoch against the later ones.

Core layer: imports nothing of ours; imports jax only when the Keras backend is JAX.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from types import TracebackType
from typing import Any

# JAX's event names (jax._src.dispatch.BACKEND_COMPILE_EVENT, jax._src.compiler).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# Keras's compiled functions; every other compilation is an eager op (weight initialisers,
# variable assignments) and is counted as ``other``.
STEP_FUNCTIONS = ("train_step", "test_step", "predict_step")


def step_name(fun_name: str) -> str:
    """``jit(train_step)`` -> ``train_step``; anything not a Keras step -> ``other``."""
    inner = fun_name.removeprefix("jit(").removesuffix(")")
    return inner if inner in STEP_FUNCTIONS else "other"


class CompileMeter:
    """Context manager recording JAX compilations while it is open.

    ``summary()`` gives ``compile_seconds`` (time in XLA compilation or in loading a
    program from the persistent cache), ``compiles`` (count per Keras step function and
    ``other``), ``compile_seconds_by_function`` and ``compile_cache_hits``; an empty dict
    when the backend is not JAX.
    """

    def __init__(self) -> None:
        self.active = os.environ.get("KERAS_BACKEND") == "jax"
        self.counts: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.cache_hits = 0

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            name = step_name(str(kwargs.get("fun_name", "")))
            self.counts[name] += 1
            self.seconds[name] += duration

    def _on_event(self, event: str, **kwargs: Any) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self) -> CompileMeter:
        if self.active:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(self._on_duration)
            jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.active:
            import jax.monitoring

            jax.monitoring.unregister_event_duration_listener(self._on_duration)
            jax.monitoring.unregister_event_listener(self._on_event)

    def summary(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {
            "compile_seconds": round(sum(self.seconds.values()), 2),
            "compiles": dict(sorted(self.counts.items())),
            "compile_seconds_by_function": {
                name: round(seconds, 2) for name, seconds in sorted(self.seconds.items())
            },
            "compile_cache_hits": self.cache_hits,
        }
