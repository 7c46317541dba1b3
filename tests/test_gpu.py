"""GPU-only checks of the SD policy: half-precision weights, float32 log-probs, xformers.

They run on a CUDA machine (`pytest -m gpu`) and skip elsewhere (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.policies.diffusion import DiffusionPolicy

PROMPTS = ["a red circle", "a blue square"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rescoring_reproduces_log_probs(dtype: torch.dtype) -> None:
    policy = DiffusionPolicy(
        build_tiny_random_sd().to(dtype=dtype),
        ModelConfig(lora=LoraConfig(enabled=True)),
        SampleConfig(num_steps=4, guidance_scale=3.0, batch_size=2),
        device="cuda",
    )
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rollout.log_probs.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    rescored = policy.step_log_prob(rollout, torch.arange(4))
    assert (rescored - rollout.log_probs).abs().max() < 1e-5


@pytest.mark.gpu
def test_xformers_attention_matches_sdpa() -> None:
    pytest.importorskip("xformers")
    configs = [ModelConfig(attention=name, lora=LoraConfig(enabled=True)) for name in ("sdpa", "xformers")]
    policies = [
        DiffusionPolicy(build_tiny_random_sd(), config, SampleConfig(num_steps=3, guidance_scale=1.0), device="cuda")
        for config in configs
    ]
    rollouts = [p.sample(PROMPTS, generator=torch.Generator().manual_seed(0)) for p in policies]
    torch.testing.assert_close(rollouts[0].log_probs, rollouts[1].log_probs, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_stepping_through_a_grid_table_never_synchronises_the_device() -> None:
    """Re-scoring through the grids' step tables and DDPO's loss launch device work only: under
    CUDA's sync debug mode "error" any call that waits for the device would raise."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from align_gen.objectives.ddpo import ddpo_loss
    from pipelines.kernels import DDIMStepTable, FlowSDEStepTable

    ddim = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (ddim, flow):
        scheduler.set_timesteps(10)
    tables = [DDIMStepTable.from_scheduler(ddim, 1.0, "cuda"), FlowSDEStepTable.from_scheduler(flow, 0.7, "cuda")]
    sample, output, prev = torch.randn(3, 4, 4, 8, 8, device="cuda").unbind(0)
    index = torch.tensor([0, 5, 8, 9], device="cuda")
    old_log_prob, advantages = torch.randn(2, 4, device="cuda").unbind(0)
    output.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for table in tables:
            log_prob = table.step(output, index, sample, prev_sample=prev)[1]
            loss, metrics = ddpo_loss(log_prob, old_log_prob, advantages, 1e-4)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert output.grad is not None and set(metrics) == {"approx_kl", "clipfrac", "ratio"}
