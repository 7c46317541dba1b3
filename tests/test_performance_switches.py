"""The performance switches change how the model runs, never what it computes:
``model.channels_last``, ``model.offload_frozen``, ``model.attention`` (one SDPA kernel) and ``model.compile`` (torch.compile; the "eager" backend traces the
graph through dynamo without inductor's minutes of compilation, so the wiring is checked fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.config import ModelConfig, SampleConfig, load_config
from align_gen.errors import ConfigError
from align_gen.policies import build_policy
from align_gen.tracking import read_metrics
from align_gen.train import train

PROMPTS = ["a red circle", "a blue square"]
pytestmark = pytest.mark.usefixtures("single_thread")


def test_channels_last_reproduces_the_log_probs_of_the_default_layout() -> None:
    sample = SampleConfig(num_steps=3, guidance_scale=2.0, batch_size=2)
    plain = build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd"), sample, "cpu")
    rollout = plain.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    fast = build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd", channels_last=True), sample, "cpu")
    weight = next(p for p in fast.model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    again = fast.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again.log_probs, rollout.log_probs, atol=1e-5)
    assert torch.allclose(fast.step_log_prob(rollout, torch.arange(3)), rollout.log_probs, atol=1e-5)


@pytest.mark.parametrize("switch", [{"channels_last": True}, {"offload_frozen": True}, {"attention": "sdpa_flash"}])
def test_diffusion_only_switches_are_refused_for_a_vlm(switch: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(switch))):
        build_policy(ModelConfig(pretrained="align-gen:tiny-random-llava", **switch), SampleConfig(), "cpu")


def _sdpa_flags() -> dict[str, bool]:
    """Which kernels PyTorch's scaled_dot_product_attention may use right now (global flags that
    torch.nn.attention.sdpa_kernel sets; they govern CPU dispatch too)."""
    backends = torch.backends.cuda
    return {
        "flash": backends.flash_sdp_enabled(),
        "efficient": backends.mem_efficient_sdp_enabled(),
        "cudnn": backends.cudnn_sdp_enabled(),
        "math": backends.math_sdp_enabled(),
    }


@pytest.mark.parametrize("family", ["tiny-random-sd", "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux"])
@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_one_sdpa_kernel_runs_every_denoiser_pass_and_computes_the_same(family: str, kernel: str) -> None:
    """model.attention=sdpa_<kernel> allows only that kernel inside every denoiser forward
    (seen by a forward hook), leaves it unrestricted outside, and gives the default's numbers."""
    sample = SampleConfig(num_steps=2, guidance_scale=2.0, batch_size=2)
    torch.manual_seed(0)
    plain = build_policy(ModelConfig(pretrained=f"align-gen:{family}"), sample, "cpu")
    torch.manual_seed(0)
    chosen = build_policy(ModelConfig(pretrained=f"align-gen:{family}", attention=f"sdpa_{kernel}"), sample, "cpu")
    seen: list[dict[str, bool]] = []
    chosen.model.register_forward_pre_hook(lambda module, args: seen.append(_sdpa_flags()))
    outside = _sdpa_flags()
    rollouts = [policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0)) for policy in (plain, chosen)]
    matching = []
    for policy in (plain, chosen):
        torch.manual_seed(1)  # the same training timesteps and noise
        matching.append(policy.matching_loss(rollouts[0], clean=rollouts[0].final_samples))
    assert seen and all(flags == {name: name == kernel for name in flags} for flags in seen)
    assert _sdpa_flags() == outside == {name: True for name in outside}
    assert torch.allclose(rollouts[0].log_probs, rollouts[1].log_probs, atol=1e-5)
    assert torch.allclose(chosen.step_log_prob(rollouts[0], torch.arange(2)), rollouts[0].log_probs, atol=1e-5)
    assert torch.allclose(matching[0], matching[1], atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa_efficient", "sdpa_cudnn", "xformers"])
def test_cuda_only_attention_is_refused_on_a_cpu_with_the_choices_that_run_there(attention: str) -> None:
    with pytest.raises(ConfigError, match=f"model.attention={attention} needs a CUDA device.*sdpa_flash or sdpa_math"):
        build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd", attention=attention), SampleConfig(), "cpu")


def test_a_compiled_run_trains_and_matches_the_uncompiled_one(tmp_path: Path, tiny_train_overrides) -> None:
    def run(name: str, *extra: str):
        config = load_config(None, [*tiny_train_overrides, "seed=3", f"output_dir={tmp_path / name}", *extra])
        return read_metrics(train(config).metrics)[0]

    torch._dynamo.reset()
    compiled = run("compiled", "model.compile=true", "model.compile_backend=eager")
    plain = run("plain")
    assert compiled["reward_mean"] == pytest.approx(plain["reward_mean"], abs=1e-6)
    assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-7)


def test_the_switches_benchmark_times_both_sides() -> None:
    """benchmarks/switches.py on the tiny model: one timed pair per side (wall and CPU time),
    ratios reported, in one flat row of the result schema."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import switches

    args = argparse.Namespace(model="align-gen:tiny-random-sd", device="cpu", steps=2, eta=1.0, guidance_scale=2.0,
                              batch_size=2, num_batches=1, repeats=1, seed=0, mixed_precision="no")
    row = switches.measure_pair(args, switches.base_config(args, "float32"), ["train.steps_per_forward=2"], "k2")
    assert row["name"] == "k2" and row["overrides"] == ["train.steps_per_forward=2"]
    for side in ("baseline", "variant"):
        assert len(row[f"{side}_update_wall_s"]) == 1 and row[f"{side}_update_median_wall_s"] > 0
        assert row[f"{side}_update_median_cpu_s"] > 0 and row[f"{side}_peak_memory_gib"] is None
    assert row["update_speedup"] > 0 and row["sample_per_pair"] > 0
    assert all(not isinstance(value, dict) for value in row.values())  # flat


def test_the_objective_benchmark_measures_every_objective() -> None:
    """benchmarks/objective_update.py on the tiny model: each objective samples (SePPO from its
    reference model) and updates; the numbers are positive and the rollouts counted."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import objective_update

    args = argparse.Namespace(model="align-gen:tiny-random-sd", device="cpu", steps=2, eta=1.0, guidance_scale=2.0,
                              batch_size=2, num_batches=1, repeats=1, seed=0, mixed_precision="no",
                              seppo_winners=str(objective_update.SEPPO_WINNERS))
    for name in objective_update.OBJECTIVES:
        row = objective_update.measure(args, name, "float32")
        assert row["name"] == name and row["rollouts"] == 2
        assert row["update_median_wall_s"] > 0 and row["update_median_cpu_s"] > 0 and row["sampling_wall_s"] > 0


@pytest.mark.parametrize("family", ["tiny-random-sd", "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux"])
def test_offloading_the_frozen_modules_changes_nothing_but_where_they_live(family: str) -> None:
    """model.offload_frozen keeps the VAE and text encoders on the CPU between uses; on this CPU
    machine the moves are no-ops, so this checks the wiring: every path that runs them
    (prompt encoding, decoding, encoding dataset images) gives the same numbers."""
    sample = SampleConfig(num_steps=2, guidance_scale=2.0, batch_size=2)
    torch.manual_seed(0)
    plain = build_policy(ModelConfig(pretrained=f"align-gen:{family}"), sample, "cpu")
    torch.manual_seed(0)
    offloaded = build_policy(ModelConfig(pretrained=f"align-gen:{family}", offload_frozen=True), sample, "cpu")
    rollouts = [policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0)) for policy in (plain, offloaded)]
    assert torch.equal(rollouts[0].images, rollouts[1].images)
    assert torch.equal(rollouts[0].log_probs, rollouts[1].log_probs)
    assert torch.equal(plain.encode_samples(rollouts[0].images), offloaded.encode_samples(rollouts[0].images))
    for module in (offloaded.vae, *offloaded.text_encoders):
        assert next(module.parameters()).device.type == "cpu"
