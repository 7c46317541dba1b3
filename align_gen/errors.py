"""Errors a user can act on. The CLI prints them as one line and exits non-zero.

Raise these (never a bare assert or a library traceback) for bad input: a config key that does
not exist, a value of the wrong type, a missing file or weight, a reward that returns NaN.
Each message says what was wrong, what is valid, and what to do. The reward models, a package
of their own, raise theirs (:mod:`reward_models.errors`); :data:`USER_ERRORS` is both kinds.
"""

from reward_models.errors import RewardError, RewardModelError

__all__ = [
    "USER_ERRORS",
    "AlignGenError",
    "CheckpointError",
    "ConfigError",
    "MissingWeightsError",
    "NonFiniteSamplesError",
    "RewardError",
    "TrainingDivergedError",
]


class AlignGenError(Exception):
    """Base class of the errors caused by the user's input or environment."""


class ConfigError(AlignGenError, ValueError):
    """A config key is unknown, or a value has the wrong type or is out of range."""


class MissingWeightsError(AlignGenError, FileNotFoundError):
    """A model's weights are not available locally (and the hub is unreachable)."""


class CheckpointError(AlignGenError):
    """A checkpoint is missing, damaged (does not match its manifest) or unreadable."""


class NonFiniteSamplesError(AlignGenError, RuntimeError):
    """A model's samples (or their log-probs) hold NaN or inf: its weights are broken."""


class TrainingDivergedError(AlignGenError, RuntimeError):
    """The loss, gradients, weights or samples became NaN or infinite during training."""


# What the CLI reports as one line with exit status 2: every error the user's input causes.
USER_ERRORS = (AlignGenError, RewardModelError)
