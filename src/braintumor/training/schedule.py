"""The learning rate of a phase: a constant that plateaus lower, or warm-up then cosine.

Kept apart from the phase so that the rule is one pure function of the phase's settings
and its steps per epoch: the schedule is a function of the optimizer's step counter,
which the per-epoch training state saves, so a resumed phase continues on the same curve.
"""

from __future__ import annotations

from typing import Any

from braintumor.core.schema import PhaseParams


def learning_rate(settings: PhaseParams, steps_per_epoch: int) -> float | Any:
    """What the optimizer is given: ``settings.learning_rate`` for ``plateau`` (which
    ``ReduceLROnPlateau`` may lower), or a Keras schedule for ``cosine``: linear from 0 to
    ``learning_rate`` over ``warmup_epochs``, then a half cosine down to 0 at the end of
    the last epoch."""
    if settings.schedule == "plateau":
        return settings.learning_rate
    import keras

    warmup = round(settings.warmup_epochs * steps_per_epoch)
    total = settings.epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else settings.learning_rate,
        decay_steps=max(total - warmup, 1),
        alpha=0.0,
        warmup_target=settings.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
