"""Errors a user can act on, raised by the reward models.

``reward_models`` stands alone (it imports nothing from ``align_gen``), so it has its own
errors. Every message says what was wrong, what is valid, and what to do; align-gen's CLI
prints them as one line and exits with status 2.
"""


class RewardModelError(Exception):
    """Base class of the reward errors caused by the user's input or environment."""


class RewardConfigError(RewardModelError, ValueError):
    """A reward name or option is unknown, or an option's value has the wrong type or range."""


class RewardWeightsMissingError(RewardModelError, FileNotFoundError):
    """A reward model's weights are not available locally (and the hub is unreachable)."""


class RewardError(RewardModelError, RuntimeError):
    """A reward failed on its inputs, or returned a non-finite value."""
