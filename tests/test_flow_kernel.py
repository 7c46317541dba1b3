"""Tests of the flow-matching SDE kernel against its formula, torch.distributions and diffusers'
FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipelines.kernels import FlowSDEStepTable, flow_sde_step_with_logprob, flow_sigmas

SHAPE = (3, 4, 8, 8)  # (B, C, h, w): a tiny latent batch
NUM_STEPS = 10
A = 0.7  # noise_level, Flow-GRPO's default


def make_scheduler(
    shift: float = 1.0, num_steps: int = NUM_STEPS
) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def random_inputs(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, ...]:
    """(model_output, sample, another latent), float32, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen) for _ in range(3))


def reference_mean_std(
    v: torch.Tensor, sigma: float, sigma_next: float, x: torch.Tensor, a: float
) -> tuple[torch.Tensor, float]:
    """Flow-GRPO's flow SDE step, written out independently in float64.

    std_t = a sqrt(sigma / (1 - sigma)), with 1 - sigma -> 1 - sigma_next at sigma = 1 (the
    documented guard); mean = x + [v + std_t^2/(2 sigma) (x + (1 - sigma) v)] dt; the step's std
    is std_t sqrt(|dt|).
    """
    dt = sigma_next - sigma
    denominator = 1 - sigma_next if sigma == 1 else 1 - sigma
    std_t = a * math.sqrt(sigma / denominator)
    x, v = x.double(), v.double()
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, std_t * math.sqrt(-dt)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (0.6, 0.5), (0.1, 0.0)])
def test_log_prob_matches_torch_normal(reduce: str, sigma: float, sigma_next: float) -> None:
    """(a) log_prob == Normal(mean, std).log_prob(x_next) reduced over (C, h, w); covers the
    guarded first step (sigma = 1) and the last step to sigma = 0."""
    model_output, sample, prev_sample = random_inputs()
    out, log_prob = flow_sde_step_with_logprob(
        model_output, sigma, sigma_next, sample, A, prev_sample=prev_sample, reduce=reduce
    )
    assert out is prev_sample
    mean, std = reference_mean_std(model_output, sigma, sigma_next, sample, A)
    element = torch.distributions.Normal(mean, std).log_prob(prev_sample.double())  # (B, C, h, w)
    expected = element.mean((1, 2, 3)) if reduce == "mean" else element.sum((1, 2, 3))
    assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-4)


def test_first_step_std_is_noise_level() -> None:
    """The sigma = 1 guard by hand: with x = v = 0 the mean is 0, and std_t sqrt(|dt|) =
    a sqrt(1 / |dt|) sqrt(|dt|) = a, so x_next = a z for the generator's z, at any step size."""
    zeros = torch.zeros(SHAPE)
    for sigma_next in (0.9, 0.99):
        x_next, _ = flow_sde_step_with_logprob(
            zeros, 1.0, sigma_next, zeros, A, generator=torch.Generator().manual_seed(7)
        )
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(x_next, A * z)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_equals_diffusers_euler_step(shift: float) -> None:
    """(b) noise_level 0 is FlowMatchEulerDiscreteScheduler.step, bit for bit, at every step of a
    10-step schedule (shift 3 as SD3 uses), and draws no noise from the generator."""
    scheduler = make_scheduler(shift)
    assert scheduler.sigmas[0] == 1.0 and scheduler.sigmas[-1] == 0.0
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(SHAPE, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(SHAPE, generator=gen)
        state = gen.get_state()
        ours, log_prob = flow_sde_step_with_logprob(
            model_output,
            *flow_sigmas(scheduler, i),
            sample,
            noise_level=0.0,
            generator=gen,
            return_log_prob=False,
        )
        theirs = scheduler.step(model_output, t, sample).prev_sample
        assert log_prob is None and torch.equal(gen.get_state(), state)
        assert torch.equal(ours, theirs)
        sample = theirs


def test_flow_sigmas_reads_the_schedule() -> None:
    scheduler = make_scheduler(3.0)
    sigma, sigma_next = flow_sigmas(scheduler, torch.tensor([0, 4, NUM_STEPS - 1]))
    assert torch.equal(sigma, scheduler.sigmas[[0, 4, NUM_STEPS - 1]])
    assert torch.equal(sigma_next, scheduler.sigmas[[1, 5, NUM_STEPS]])
    assert sigma_next[-1] == 0.0  # the last step ends at the data
    assert flow_sigmas(scheduler, 2)[0].ndim == 0


def test_per_sample_sigmas_equal_separate_calls() -> None:
    """(c) (B,) sigmas score each sample as if it were alone with scalar sigmas."""
    model_output, sample, prev_sample = random_inputs(1)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.1]), torch.tensor([0.9, 0.45, 0.0])
    _, log_prob = flow_sde_step_with_logprob(
        model_output, sigma, sigma_next, sample, A, prev_sample=prev_sample, reduce="sum"
    )
    for b in range(SHAPE[0]):
        _, alone = flow_sde_step_with_logprob(
            model_output[b : b + 1],
            sigma[b].item(),
            sigma_next[b],
            sample[b : b + 1],
            A,
            prev_sample=prev_sample[b : b + 1],
            reduce="sum",
        )
        torch.testing.assert_close(log_prob[b : b + 1], alone, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescoring_reproduces_sampled_log_prob_and_gradient(dtype: torch.dtype) -> None:
    """(d) Re-scoring the sampled x_next gives bit-identical log-probs (PPO ratio exactly 1) and
    the same gradient w.r.t. model_output: the sampled x_next is a fixed point in both."""
    model_output, sample, _ = (x.to(dtype) for x in random_inputs(2))
    model_output.requires_grad_(True)
    sigma, sigma_next = flow_sigmas(make_scheduler(3.0), 3)
    gen = torch.Generator().manual_seed(3)
    prev_sample, log_prob = flow_sde_step_with_logprob(
        model_output, sigma, sigma_next, sample, A, generator=gen
    )
    assert prev_sample.dtype == dtype and log_prob.dtype == torch.float32
    (sampled_grad,) = torch.autograd.grad(log_prob.sum(), model_output)
    assert torch.isfinite(sampled_grad).all() and sampled_grad.abs().sum() > 0

    again, rescored = flow_sde_step_with_logprob(
        model_output, sigma, sigma_next, sample, A, prev_sample=prev_sample.detach()
    )
    assert torch.equal(again, prev_sample) and torch.equal(rescored, log_prob)
    (rescored_grad,) = torch.autograd.grad(rescored.sum(), model_output)
    torch.testing.assert_close(sampled_grad, rescored_grad)


def test_generator_makes_sampling_reproducible() -> None:
    """(f) One seed, one sample; another seed, another sample."""
    model_output, sample, _ = random_inputs()

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return flow_sde_step_with_logprob(model_output, 0.8, 0.7, sample, A, generator=gen)

    first, second, other = draw(5), draw(5), draw(6)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_invalid_inputs_raise() -> None:
    """(e) Every unusable input fails early with a message that says what is valid."""
    v, x, _ = random_inputs()
    step = flow_sde_step_with_logprob
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        step(v, 0.5, 0.4, x, noise_level=-0.1)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        step(v, 0.5, 0.4, x, noise_level=float("nan"))
    with pytest.raises(ValueError, match="return_log_prob=False"):
        step(v, 0.5, 0.4, x, noise_level=0.0)  # the ODE has no log-density
    with pytest.raises(ValueError, match="re-scored"):
        step(v, 0.5, 0.4, x, prev_sample=x, return_log_prob=False)
    with pytest.raises(ValueError, match="reduce"):
        step(v, 0.5, 0.4, x, reduce="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_output shape"):
        step(v[:2], 0.5, 0.4, x)
    with pytest.raises(ValueError, match="prev_sample shape"):
        step(v, 0.5, 0.4, x, prev_sample=x[:1])
    with pytest.raises(ValueError, match=">= 2 dims"):
        step(v[:, 0, 0, 0], 0.5, 0.4, x[:, 0, 0, 0])
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        step(v, torch.tensor([0.5, 0.4]), 0.3, x)
    with pytest.raises(ValueError, match="not scheduler.timesteps"):
        step(v, 1000.0, 960.0, x)  # timesteps instead of sigmas
    for sigma in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"sigma must lie in \(0, 1\]"):
            step(v, sigma, 0.0, x)
    for sigma_next in (0.5, 0.6, -0.1):  # a zero-length step, a step backwards, past the data
        with pytest.raises(ValueError, match=r"sigma_next must lie in \[0, sigma\)"):
            step(v, 0.5, sigma_next, x)
    with pytest.raises(ValueError, match="std 0"):  # even for the ODE, no zero-length steps
        sigma, sigma_next = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.4, 0.5, 0.4])
        step(v, sigma, sigma_next, x, noise_level=0.0, return_log_prob=False)
    unset = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_sigmas(unset, 0)
    with pytest.raises(ValueError, match="integer position"):
        flow_sigmas(make_scheduler(), torch.tensor(960.0))
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        flow_sigmas(make_scheduler(), NUM_STEPS)


def test_sde_preserves_the_flow_marginals_of_a_point_mass() -> None:
    """(g) For data = a point mass at x0, x_sigma = (1 - sigma) x0 + sigma eps has the exact
    velocity v = eps - x0 = (x_sigma - x0) / sigma. Integrating the SDE (a = 0.7) with it from
    sigma = 1 over an SD3-style grid (100 steps, shift 3) must keep the marginal
    N((1 - sigma) x0, sigma^2) along the way and end at x0.

    Tolerance 0.08 sigma on the mean and 8% on the std: 4000 samples give both to ~0.016 (one
    standard error), and seeds 0-5 stay within 0.04 (Euler-Maruyama error, largest after the
    guarded first step). Noise without the SDE's score term would be ~0.8 sigma off here.
    """
    x0, batch = 2.0, 4000
    scheduler = make_scheduler(shift=3.0, num_steps=100)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, generator=gen)  # x_1 = eps
    for i in range(100):
        sigma, sigma_next = flow_sigmas(scheduler, i)
        velocity = (x - x0) / sigma
        x, _ = flow_sde_step_with_logprob(velocity, sigma, sigma_next, x, A, generator=gen)
        if i in (20, 60, 90):  # sigma_next = 0.918, 0.653, 0.215
            s = sigma_next.item()
            assert abs(x.mean().item() - (1 - s) * x0) < 0.08 * s
            assert abs(x.std().item() / s - 1) < 0.08
    assert abs(x.mean().item() - x0) < 0.01 and x.std().item() < 0.02


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_grid_table_steps_exactly_as_the_kernel(shift: float) -> None:
    """A step through the grid's table (scalars computed once, then gathered by step index)
    draws and re-scores bit for bit what the per-call kernel does at the same flow times, the
    guarded first step (sigma = 1) and the last (sigma_next = 0) included."""
    scheduler = make_scheduler(shift)
    table = FlowSDEStepTable.from_scheduler(scheduler, A)
    model_output, sample, _ = random_inputs()
    index = torch.tensor([0, 4, NUM_STEPS - 1])
    sigma, sigma_next = flow_sigmas(scheduler, index)
    drawn, log_prob = table.step(model_output, index, sample, generator=torch.Generator().manual_seed(3))
    expected, expected_log_prob = flow_sde_step_with_logprob(
        model_output, sigma, sigma_next, sample, A, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(drawn, expected) and torch.equal(log_prob, expected_log_prob)
    rescored = table.step(model_output, index, sample, prev_sample=drawn, reduce="sum")[1]
    expected = flow_sde_step_with_logprob(model_output, sigma, sigma_next, sample, A, drawn, reduce="sum")[1]
    assert torch.equal(rescored, expected)
    ode = FlowSDEStepTable.from_scheduler(scheduler, 0.0).step(model_output, index, sample, return_log_prob=False)
    assert torch.equal(ode[0], flow_sde_step_with_logprob(model_output, sigma, sigma_next, sample, 0.0, return_log_prob=False)[0])
