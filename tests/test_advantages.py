"""Tests of the reward normalisers, with expected values derived by hand in each docstring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align_gen.advantages import (
    BatchNormalizer,
    GroupNormalizer,
    PerPromptNormalizer,
    batch_normalize,
    build_advantage_fn,
    group_normalize,
)
from align_gen.errors import ConfigError, RewardError

EPS = 1e-4


def r(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-6)


def test_per_prompt_falls_back_to_batch_then_uses_buffers() -> None:
    """buffer_size 4, min_count 3.

    Batch 1: a -> [1, 3], b -> [5, 7]: both buffers hold 2 < 3, so the batch's stats are used:
    mean 4, population var (9+1+1+9)/4 = 5, std sqrt(5) = 2.2360680;
    A = [-3, -1, 1, 3] / 2.2361680 = [-1.3415815, -0.4471938, 0.4471938, 1.3415815].
    Batch 2: a buffer [1, 3, 2, 6]: mean 3, var (4+0+1+9)/4 = 3.5, std 1.8708287;
    A(2) = -1/1.8709287 = -0.5344940, A(6) = 3/1.8709287 = 1.6034820.
    b buffer [5, 7, 5, 5]: mean 5.5, var (0.25+2.25+0.25+0.25)/4 = 0.75, std 0.8660254;
    A(5) = -0.5/0.8661254 = -0.5772837.
    """
    normalizer = PerPromptNormalizer(buffer_size=4, min_count=3)
    first = normalizer(["a", "a", "b", "b"], r(1, 3, 5, 7))
    s5 = math.sqrt(5) + EPS
    close(first, [-3 / s5, -1 / s5, 1 / s5, 3 / s5])
    assert normalizer.stats()["last_fallback_fraction"] == 1.0

    second = normalizer(["a", "b", "a", "b"], r(2, 5, 6, 5))
    sa, sb = math.sqrt(3.5) + EPS, math.sqrt(0.75) + EPS
    close(second, [-1 / sa, -0.5 / sb, 3 / sa, -0.5 / sb])
    assert normalizer.stats() == {
        "num_prompts": 2.0,
        "mean_buffer_len": 4.0,
        "last_fallback_fraction": 0.0,
    }


def test_per_prompt_buffer_evicts_oldest_and_new_prompt_falls_back() -> None:
    """After batches 1-2 above, batch 3 = (a: 10, c: 0).

    a's buffer (maxlen 4) drops its oldest 1: [3, 2, 6, 10], mean 5.25,
    var (5.0625+10.5625+0.5625+22.5625)/4 = 9.6875, std 3.1124749; A = 4.75/3.1125749 = 1.5260729.
    c holds 1 < 3 rewards, so it uses the batch [10, 0]: mean 5, std 5; A = -5/5.0001 = -0.99998.
    """
    normalizer = PerPromptNormalizer(buffer_size=4, min_count=3)
    normalizer(["a", "a", "b", "b"], r(1, 3, 5, 7))
    normalizer(["a", "b", "a", "b"], r(2, 5, 6, 5))
    third = normalizer(["a", "c"], r(10, 0))
    close(third, [4.75 / (math.sqrt(9.6875) + EPS), -5 / (5 + EPS)])
    assert dict(normalizer.state_dict()["buffers"])["a"] == [3.0, 2.0, 6.0, 10.0]
    assert normalizer.stats()["last_fallback_fraction"] == 0.5


def test_clipping() -> None:
    """99 zeros and one 1: mean 0.01, population var 0.01*0.99 = 0.0099, std 0.0994987.

    The 1 gets 0.99/0.0995987 = 9.94 -> clipped to 5; each 0 gets -0.01/0.0995987 = -0.1004029.
    """
    rewards = torch.zeros(100)
    rewards[7] = 1.0
    advantages = batch_normalize(rewards)
    zero = -0.01 / (math.sqrt(0.0099) + EPS)
    expected = [zero] * 100
    expected[7] = 5.0
    close(advantages, expected)
    assert batch_normalize(rewards, clip=2.0)[7] == 2.0
    per_prompt = PerPromptNormalizer(clip=3.0)(["p"] * 100, rewards)  # all in fallback: batch stats
    assert per_prompt[7] == 3.0


def test_batch_normalize_by_hand() -> None:
    """[1, 2, 3]: mean 2, population std sqrt(2/3) = 0.8164966; A = [-1, 0, 1] / 0.8165966."""
    s = math.sqrt(2 / 3) + EPS
    close(batch_normalize(r(1, 2, 3)), [-1 / s, 0.0, 1 / s])
    close(batch_normalize(r(4, 4)), [0.0, 0.0])  # ties: 0 / eps = 0, not NaN


def test_group_normalize_by_hand() -> None:
    """a = [1, 5] and b = [3, 7]: mean 3 / 5, population std 2, A = -+2/2.0001 = -+0.99995.

    c = [10] alone: std 0, A = 0. Batch order is kept and string or tensor ids agree.
    """
    rewards = r(1, 3, 5, 7, 10)
    unit = 2 / (2 + EPS)
    expected = [-unit, -unit, unit, unit, 0.0]
    close(group_normalize(rewards, ["a", "b", "a", "b", "c"]), expected)
    close(group_normalize(rewards, torch.tensor([4, 1, 4, 1, 9])), expected)
    with pytest.raises(ValueError, match="5 rewards"):
        group_normalize(rewards, ["a", "b"])


def test_state_round_trip_reproduces_outputs() -> None:
    """A normaliser restored from JSON continues exactly like the original."""
    prompts = ["a", "b", "c", "a", "b", "c"]
    batches = [torch.randn(6, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    original = PerPromptNormalizer(buffer_size=5, min_count=4)
    for batch in batches[:3]:
        original(prompts, batch)
    restored = PerPromptNormalizer(buffer_size=5, min_count=4)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.stats() == original.stats() | {"last_fallback_fraction": 0.0}
    for batch in batches[3:]:
        assert torch.equal(restored(prompts, batch), original(prompts, batch))
    with pytest.raises(ConfigError, match="buffer_size=5"):
        PerPromptNormalizer(buffer_size=8, min_count=4).load_state_dict(original.state_dict())


def test_factory_and_interface() -> None:
    prompts, rewards = ["a", "b", "a", "b"], r(1, 3, 5, 7)
    per_prompt = build_advantage_fn("per_prompt", buffer_size=8, min_count=2)
    assert isinstance(per_prompt, PerPromptNormalizer) and per_prompt.min_count == 2
    batch = build_advantage_fn("batch", clip=1.0)
    assert isinstance(batch, BatchNormalizer)
    torch.testing.assert_close(batch(prompts, rewards), batch_normalize(rewards, clip=1.0))
    group = build_advantage_fn("group")
    assert isinstance(group, GroupNormalizer)
    torch.testing.assert_close(group(prompts, rewards), group_normalize(rewards, prompts))
    for stateless in (batch, group):
        assert stateless.state_dict() == {} and stateless.stats() == {}
        stateless.load_state_dict({})
        with pytest.raises(ConfigError, match="stateless"):
            stateless.load_state_dict(per_prompt.state_dict())
    with pytest.raises(ConfigError, match="valid: \\['batch', 'group', 'per_prompt'\\]"):
        build_advantage_fn("ranked")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="buffer_size"):
        build_advantage_fn("batch", buffer_size=4)


def test_invalid_input_raises() -> None:
    with pytest.raises(RewardError, match="not finite"):
        PerPromptNormalizer()(["a", "b"], r(1.0, float("nan")))
    with pytest.raises(RewardError, match="not finite"):
        batch_normalize(r(1.0, float("inf")))
    with pytest.raises(ValueError, match="2 prompts"):
        PerPromptNormalizer()(["a", "b"], r(1, 2, 3))
    with pytest.raises(ValueError, match="non-empty"):
        batch_normalize(torch.zeros(0))
    with pytest.raises(ConfigError, match="min_count"):
        PerPromptNormalizer(buffer_size=8, min_count=16)
    with pytest.raises(ConfigError, match="eps"):
        batch_normalize(r(1, 2), eps=0.0)


def test_per_prompt_state_of_vision_language_prompts_round_trips_through_json() -> None:
    """A VLM's prompt key is (question, image key): its buffers survive a checkpoint's state.json,
    and a state saved before such keys existed (a dict of string keys) still loads."""
    import json

    normalizer = PerPromptNormalizer(buffer_size=4, min_count=1)
    normalizer([("what colour?", "img0"), ("what colour?", "img1"), "a text prompt"], r(1, 2, 3))
    restored = PerPromptNormalizer(buffer_size=4, min_count=1)
    restored.load_state_dict(json.loads(json.dumps(normalizer.state_dict())))
    assert restored.state_dict() == normalizer.state_dict()
    close(restored([("what colour?", "img0")], r(3)), normalizer([("what colour?", "img0")], r(3)).tolist())
    legacy = PerPromptNormalizer(buffer_size=4, min_count=1)
    legacy.load_state_dict({"buffer_size": 4, "min_count": 1, "buffers": {"a": [1.0, 2.0]}})
    assert dict(legacy.state_dict()["buffers"]) == {"a": [1.0, 2.0]}


def test_group_normalize_over_the_batch_std() -> None:
    """Groups a: (1, 3) and b: (10, 10); batch mean 6, deviations (-5, -3, 4, 4), population
    variance 66 / 4 = 16.5: A = (r - group mean) / (sqrt(16.5) + 1e-4) = (-1, 1, 0, 0) / 4.0621."""
    from align_gen.advantages import build_advantage_fn, group_normalize

    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (16.5**0.5 + 1e-4)
    torch.testing.assert_close(group_normalize(rewards, ["a", "a", "b", "b"], global_std=True), expected)
    torch.testing.assert_close(build_advantage_fn("group", global_std=True)(["a", "a", "b", "b"], rewards), expected)
    own = group_normalize(rewards, ["a", "a", "b", "b"])  # each group's own std: 1 and 0
    torch.testing.assert_close(own, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (1 + 1e-4))
