"""The full-size benchmark helpers: random architectures from public configs, and the
anchor-style DDPO update that ``benchmarks/ddpo_update.py --compare-anchor`` times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ddpo_update  # noqa: E402
import full_size  # noqa: E402
import harness  # noqa: E402

from align_gen.config import ModelConfig, SampleConfig  # noqa: E402
from align_gen.objectives import build_objective  # noqa: E402
from align_gen.objectives.ddpo import DDPOConfig  # noqa: E402
from align_gen.policies import DenoiserPolicy, VLMPolicy, build_policy  # noqa: E402
from align_gen.policies.diffusion import DiffusionPolicy  # noqa: E402
from align_gen.policies.flow import FlowPolicy  # noqa: E402


def test_full_configs_have_the_published_parameter_counts() -> None:
    """Counted on the meta device (no memory, no init): SD1.5's UNet 859,520,964, its VAE
    83,653,863, CLIP ViT-L/14's text tower 123,060,480; SD3.5-Medium's MMDiT-X ~2.24B;
    Qwen2-VL-2B 2,208,985,600 (embedding tied to the LM head)."""
    assert full_size.meta_parameter_count("sd15", "unet") == 859_520_964
    assert full_size.meta_parameter_count("sd15", "vae") == 83_653_863
    assert full_size.meta_parameter_count("sd15", "text_encoder") == 123_060_480
    assert 2.2e9 < full_size.meta_parameter_count("sd35m", "transformer") < 2.3e9
    assert full_size.meta_parameter_count("qwen2vl-2b", "model") == 2_208_985_600
    assert full_size.meta_parameter_count("sd15", "unet", "mid") < 30e6


def test_unknown_random_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="random:sd15-mid"):
        full_size.resolve("random:sd16")
    assert full_size.resolve("align-gen:tiny-random-sd") == "align-gen:tiny-random-sd"
    assert "random:qwen2vl-2b" in full_size.model_names()


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("random:sd15-tiny", DiffusionPolicy),
        ("random:sd35m-tiny", FlowPolicy),
        ("random:qwen2vl-2b-tiny", VLMPolicy),
    ],
)
def test_tiny_scale_builds_once_and_loads_through_build_policy(
    tmp_path: Path, name: str, family: type, single_thread: None
) -> None:
    folder = full_size.resolve(name, root=tmp_path)
    assert Path(folder, full_size.MARKER).is_file()
    assert full_size.resolve(name, root=tmp_path) == folder  # cached: not rebuilt
    sample = SampleConfig(num_steps=2, batch_size=2, guidance_scale=2.0, max_new_tokens=3)
    policy = build_policy(ModelConfig(pretrained=folder), sample, "cpu", trainable=False)
    assert isinstance(policy, family)
    if isinstance(policy, DenoiserPolicy):
        rollout = policy.sample(["a cat", "a dog"], generator=torch.Generator().manual_seed(0))
        assert rollout.log_probs.shape == (2, 2) and torch.isfinite(rollout.log_probs).all()
    if isinstance(policy, FlowPolicy):  # the transformer sees 77 CLIP + 256 T5 text tokens
        assert policy.encode_prompts(["a cat"])["prompt_embeds"].shape[1] == 333


def test_anchor_gradient_equals_align_gen_ddpo_gradient(single_thread: None) -> None:
    """The anchor-style minibatch (a loop over timesteps, CFG as two UNet passes of B rows)
    and align-gen's DDPO loss pieces (CFG as one pass of 2B), from the same generator state,
    re-score the same transitions and give the same LoRA gradient up to float rounding."""
    sample = SampleConfig(num_steps=3, batch_size=2, guidance_scale=5.0)
    policy = build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd"), sample, "cpu")
    accelerator = Accelerator(cpu=True)
    rollout = policy.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))
    rollout.advantages = torch.tensor([1.0, -0.5])
    objective = build_objective(DDPOConfig(clip_range=0.1))
    parameters = list(policy.trainable_parameters())

    def gradient(backward) -> torch.Tensor:
        for p in parameters:
            p.grad = None
        backward(torch.Generator().manual_seed(7))
        return torch.cat([p.grad.flatten() for p in parameters])

    def ours(generator: torch.Generator) -> None:
        for term in objective.loss_terms(policy, rollout, generator):
            term.loss.backward()

    def anchor(cfg: str):
        def backward(generator: torch.Generator) -> None:
            order = ddpo_update.anchor_step_order(2, 3, 1.0, generator)
            ddpo_update.anchor_minibatch_backward(policy, rollout, order, 0.1, accelerator, cfg)

        return backward

    expected = gradient(ours)
    scale = float(expected.abs().max())
    assert scale > 1e-6  # a real gradient, not zeros on both sides
    # The anchor loop with CFG batched as ours (2B rows per pass): the same kernels, bit for bit
    # up to the order of float sums.
    torch.testing.assert_close(gradient(anchor("batched")), expected, rtol=1e-5, atol=1e-7 * scale)
    # CFG as two passes of B rows: convolutions on B rows round differently from 2B rows (a known
    # pitfall of batch-size-dependent kernels); measured max |diff| ~4e-5 of max |g|.
    torch.testing.assert_close(gradient(anchor("two-pass")), expected, rtol=1e-3, atol=2e-4 * scale)


def test_update_flops_do_not_depend_on_steps_per_forward(single_thread: None) -> None:
    """An update's model FLOPs are the same whether each forward re-scores 1, 2 or 4 denoising
    steps (the work is the same; only the batching changes)."""
    from align_gen.config import RunConfig, from_dict
    from align_gen.optimizers import build_optimizer

    counts = []
    for steps_per_forward in (1, 2, 4):
        config = from_dict(
            RunConfig,
            {
                "model": {"pretrained": "align-gen:tiny-random-sd"},
                "sample": {"num_steps": 4, "batch_size": 2, "guidance_scale": 2.0},
                "train": {"steps_per_forward": steps_per_forward},
            },
        )
        torch.manual_seed(0)
        policy = build_policy(config.model, config.sample, "cpu")
        policy.set_steps_per_forward(steps_per_forward)
        rollout = policy.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))
        rollout.advantages = torch.tensor([1.0, -0.5])
        objective, optimizer = build_objective(config.objective), build_optimizer(policy, config.train)
        counts.append(ddpo_update.update_flops(policy, objective, optimizer, rollout, config, Accelerator(cpu=True)))
    assert counts[0] > 0 and counts == [counts[0]] * 3, counts


def test_flop_counter_and_mfu_table() -> None:
    """A (4, 8) @ (8, 16) product is 2 * 4 * 8 * 16 = 1024 FLOPs; no MFU off a GPU."""
    a, b = torch.ones(4, 8), torch.ones(8, 16)
    assert harness.count_flops(lambda: a @ b) == 1024
    report = harness.flops_report(1e12, 2.0, torch.device("cpu"))
    assert report == {"tflops": 0.5, "mfu": None}


def test_timed_measures_wall_and_process_cpu_time() -> None:
    """harness.timed: the wall-clock and the process CPU seconds of one call, and its result."""
    import time

    def spin() -> int:
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        return 7

    timing, value = harness.timed(spin, torch.device("cpu"))
    assert value == 7 and timing.wall_s >= 0.05 and 0 < timing.cpu_s
    numbers = harness.timing_numbers([timing, harness.Timing(1.0, 0.5)], "update_")
    assert numbers["update_max_wall_s"] == 1.0 and numbers["update_cpu_s"] == [timing.cpu_s, 0.5]


def test_interleaved_pairs_alternate_their_order_after_one_warm_up_of_each() -> None:
    calls: list[str] = []
    sides = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("A", "B")}
    timings, last = harness.interleaved(sides, 3, torch.device("cpu"))
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]  # warm-ups, then A B, B A, A B
    assert [len(timings["A"]), len(timings["B"])] == [3, 3] and last == {"A": 7, "B": 8}


def test_time_ratio_gives_the_ratio_of_medians_the_pair_spread_and_cpu_time() -> None:
    timing = harness.Timing
    slow = [timing(2.0, 4.0), timing(3.0, 6.0), timing(4.0, 8.0)]
    fast = [timing(1.0, 1.0), timing(2.0, 2.0), timing(1.0, 4.0)]
    ratio = harness.time_ratio("fast / slow samples/s", slow, fast)
    assert ratio.value == pytest.approx(3.0 / 1.0)  # median times 3 s and 1 s
    assert (ratio.per_pair_median, ratio.per_pair_min, ratio.per_pair_max) == pytest.approx((2.0, 1.5, 4.0))
    assert ratio.cpu_value == pytest.approx(6.0 / 2.0) and ratio.cpu_per_pair_median == pytest.approx(3.0)
    assert "min 1.500, max 4.000" in ratio.describe() and "CPU time: 3.000" in ratio.describe()
