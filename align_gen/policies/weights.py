"""The trainable weights of a policy and its frozen reference, for every model family.

Two ways to train, the same for diffusers and transformers models:

- LoRA adapters on named modules, injected with peft's ``inject_adapter_in_model`` (not the
  libraries' own adapter integrations, whose peft version requirements differ: transformers 5
  refuses the peft the registry has); the reference model is the same model with its adapter
  layers switched off, so it costs no memory;
- full fine-tuning: the reference is a CPU copy of the initial weights, swapped in only for
  the duration of a reference forward pass.

A reference may also be a snapshot taken earlier with :meth:`TrainableWeights.trainable_state_dict`
(SePPO's past checkpoints, AWM's EMA); snapshots stay on the CPU and are swapped in the same way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from align_gen.config import LoraConfig

Tensor = torch.Tensor

# Written next to a saved model: which base model a LoRA folder belongs to.
MODEL_CARD_FILE = "align_gen_model.json"


def write_model_card(folder: Path, base_model: str, lora: bool) -> None:
    """The card ``align-gen sample/evaluate`` read to put a LoRA folder on its base model."""
    card = {"base_model": base_model, "kind": "lora" if lora else "full"}
    (folder / MODEL_CARD_FILE).write_text(json.dumps(card, indent=1))


class TrainableWeights:
    """Mixin: the trainable-weights half of a policy. The policy sets ``model`` (the module
    that holds every trainable weight) and calls :meth:`_make_trainable` (or leaves everything
    frozen with ``_reference_weights = None``)."""

    model: torch.nn.Module
    forward_model: torch.nn.Module  # what forward passes go through: ``model`` or a wrapper of it
    _reference_weights: dict[str, Tensor] | None = None

    def use_forward_module(self, module: torch.nn.Module) -> None:
        """Forward passes go through ``module`` (``model`` wrapped by accelerate or compiled)."""
        self.forward_model = module

    def set_training_mode(self, training: bool) -> None:
        self.model.train(training)

    def _make_trainable(self, lora: LoraConfig, target_modules: Iterable[str]) -> None:
        """Adds LoRA adapters on ``target_modules`` (peft's matching: names or name suffixes) or,
        with ``lora.enabled`` false, makes the whole model trainable and keeps a CPU copy of its
        initial weights as the reference. Trainable weights are float32 whatever the dtype of
        the frozen ones."""
        self._reference_weights = None
        if lora.enabled:
            from peft import LoraConfig as PeftLoraConfig
            from peft import inject_adapter_in_model

            self.model.requires_grad_(False)
            peft_config = PeftLoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                init_lora_weights="gaussian",
                target_modules=list(target_modules),
            )
            inject_adapter_in_model(peft_config, self.model)
        else:
            self.model.requires_grad_(True)
            self._reference_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        for param in self.trainable_parameters():
            param.data = param.data.float()

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    @contextlib.contextmanager
    def reference(self, weights: dict[str, Tensor] | None = None) -> Iterator[None]:
        """Forward passes use reference weights: the initial model when ``weights`` is None
        (adapters disabled, or the stored initial weights of a full fine-tune), else the given
        :meth:`trainable_state_dict` snapshot. Swapped weights are parked on the CPU, never
        duplicated on the accelerator."""
        if weights is None and self._reference_weights is None:
            self._set_adapters_enabled(False)
            try:
                yield
            finally:
                self._set_adapters_enabled(True)
            return
        weights = self._reference_weights if weights is None else weights
        state = self.model.state_dict(keep_vars=True)
        unknown = set(weights) - set(state)
        if unknown:
            raise ValueError(f"reference weights name {len(unknown)} unknown tensors, e.g. {sorted(unknown)[:3]}")
        with torch.no_grad():
            current = {name: state[name].detach().to("cpu", copy=True) for name in weights}
            for name, value in weights.items():
                state[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    state[name].copy_(value)

    def _set_adapters_enabled(self, enabled: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """A CPU copy of the trained weights only, keyed by parameter name (LoRA or the full
        model); a copy even on a CPU device, so later updates never change it."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().to("cpu", copy=True).contiguous() for p in self.trainable_parameters()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = set(self.trainable_state_dict()) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
