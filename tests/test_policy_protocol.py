"""The Policy protocol is the whole contract: every family implements all of it, and the trainer
and the objectives use nothing else."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.policies import build_policy
from align_gen.policy import Policy, split_steps
from align_gen.types import MatchingTerms, VisualPrompt

ROOT = Path(__file__).resolve().parents[1]
# The code written against the protocol: it may touch only what Policy declares.
PROTOCOL_USERS = [ROOT / "align_gen" / "train.py", *sorted((ROOT / "align_gen" / "objectives").glob("*.py"))]
# One built-in model of each policy class.
FAMILIES = ["tiny-random-sd", "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux", "tiny-random-llava"]


def protocol_members() -> set[str]:
    annotated = {name for klass in Policy.__mro__ for name in getattr(klass, "__annotations__", {})}
    methods = {name for name, value in vars(Policy).items() if inspect.isfunction(value)}
    return {name for name in annotated | methods if not name.startswith("_")}


def policy_attributes(path: Path) -> set[tuple[str, int]]:
    """(attribute, line) of every ``policy.X`` and ``<anything>.policy.X`` in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id == "policy") or (
            isinstance(owner, ast.Attribute) and owner.attr == "policy"
        ):
            found.add((node.attr, node.lineno))
    return found


def test_the_trainer_and_the_objectives_use_only_what_the_protocol_declares() -> None:
    members = protocol_members()
    undeclared = [
        f"{path.relative_to(ROOT)}:{line}: policy.{name}"
        for path in PROTOCOL_USERS
        for name, line in sorted(policy_attributes(path))
        if name not in members
    ]
    assert not undeclared, "not in align_gen.policy.Policy: " + ", ".join(undeclared)
    # The check sees the code: the trainer does use the protocol's training members.
    used = {name for name, _ in policy_attributes(ROOT / "align_gen" / "train.py")}
    assert {"use_forward_module", "set_steps_per_forward", "set_training_mode", "load_trainable_state_dict"} <= used


def test_split_steps_cuts_columns_into_forward_passes() -> None:
    steps = torch.arange(10).view(2, 5)
    assert [piece.tolist() for piece in split_steps(steps, 2)] == [[[0, 1], [5, 6]], [[2, 3], [7, 8]], [[4], [9]]]
    assert [piece.tolist() for piece in split_steps(torch.arange(3), None)] == [[0, 1, 2]]


@pytest.fixture(params=FAMILIES)
def policy(request):
    torch.manual_seed(0)
    model = ModelConfig(pretrained=f"align-gen:{request.param}", lora=LoraConfig(rank=2, alpha=2.0))
    return build_policy(model, SampleConfig(num_steps=2, guidance_scale=2.0, max_new_tokens=8), "cpu")


def prompts_for(policy) -> list:
    if not policy.takes_images:
        return ["a red circle", "a blue square"]
    image = lambda: __import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32), "red")  # noqa: E731
    return [VisualPrompt("what colour is the shape?", f"red-{i}", image, answer="red") for i in range(2)]


def test_every_family_implements_the_whole_protocol(policy, tmp_path: Path) -> None:
    assert isinstance(policy, Policy)
    rollout = policy.sample(prompts_for(policy), generator=torch.Generator().manual_seed(0)).check_finite()
    batch, steps = rollout.log_probs.shape
    all_steps = torch.arange(steps)

    # Re-scoring: the same log-probs, in as many forward passes as step_pieces says.
    policy.set_steps_per_forward(2)
    pieces = policy.step_pieces(all_steps)
    assert torch.equal(torch.cat(pieces), all_steps)
    assert len(pieces) == (1 if policy.takes_images else -(-steps // 2))
    with torch.no_grad():
        rescored = policy.step_log_prob(rollout, all_steps)
    torch.testing.assert_close(rescored[rollout.step_mask], rollout.log_probs[rollout.step_mask], atol=1e-4, rtol=0)

    # Matching losses against the reference, at the policy's own training inputs.
    t, noise = policy.training_timesteps(batch), policy.training_noise(batch)
    assert policy.matching_loss(rollout, t=t, noise=noise).shape == (batch,)
    terms = policy.matching_terms(rollout, t=t, noise=noise, references=[None])
    assert isinstance(terms, MatchingTerms) and terms.reference_loss.shape == terms.divergence.shape == (1, batch)
    assert torch.allclose(terms.loss, terms.reference_loss[0], atol=1e-5)  # untrained: the reference itself
    level = policy.noise_level(rollout.timesteps[:, 0])
    assert level.shape == (batch,) and bool(((level >= 0) & (level <= 1)).all())
    clean = policy.encode_samples(rollout.texts if policy.takes_images else rollout.images)
    assert clean.shape[0] == batch

    # Training members: weights out and back, the forward module, the training mode.
    state = policy.trainable_state_dict()
    assert state and set(state) == {name for name, p in policy.model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in policy.trainable_parameters()) == sum(v.numel() for v in state.values())
    policy.load_trainable_state_dict({name: torch.zeros_like(value) for name, value in state.items()})
    assert all(float(p.abs().sum()) == 0 for p in policy.trainable_parameters())
    policy.load_trainable_state_dict(state)
    calls = []
    policy.use_forward_module(_Recording(policy.model, calls))
    with torch.no_grad():
        policy.step_log_prob(rollout, all_steps[:1])
    assert calls, "forward passes must go through use_forward_module's module"
    policy.set_training_mode(True)
    assert policy.model.training
    policy.set_training_mode(False)
    assert not policy.model.training
    with policy.reference(None):
        pass
    policy.save(tmp_path / "saved")
    assert any((tmp_path / "saved").iterdir())


class _Recording(torch.nn.Module):
    """``module`` with every call recorded (a stand-in for accelerate's wrapper)."""

    def __init__(self, module: torch.nn.Module, calls: list) -> None:
        super().__init__()
        self.module, self.calls = module, calls

    def forward(self, *args, **kwargs):
        self.calls.append(1)
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)
