"""The optimizer of a run: AdamW over the policy's trainable parameters (torch's, or bitsandbytes'
8-bit AdamW), as ``train:`` configures it."""

from __future__ import annotations

import torch

from align_gen.config import TrainConfig
from align_gen.errors import ConfigError
from align_gen.policy import Policy


def build_optimizer(policy: Policy, train_config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable parameters, as ``train:`` configures it: torch's, or
    bitsandbytes' 8-bit AdamW (``train.optimizer: adamw_8bit``: moments stored in 8 bits, blockwise
    quantised, about a quarter of AdamW's state memory; the update is otherwise AdamW's)."""
    optimizer_class = torch.optim.AdamW
    if train_config.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(
                "train.optimizer=adamw_8bit needs bitsandbytes: pip install 'align-gen[gpu]' (or bitsandbytes)"
            ) from None
        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        list(policy.trainable_parameters()),
        lr=train_config.learning_rate,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
        weight_decay=train_config.weight_decay,
        eps=train_config.adam_epsilon,
    )
