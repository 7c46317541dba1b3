"""An update reads nothing back from the device per denoising step, loss piece, minibatch or
optimizer step: its statistics stay on the device and are read once, at its end, and the
sampler's per-step scalars are precomputed once per grid on the device.

On a GPU each such read (``.item()``, ``float()``, ``bool()`` or ``int()`` of a tensor, ``.cpu()``,
``.tolist()``, ``.numpy()``) waits for every queued kernel: the device idles while the host
catches up. These tests count the reads made from align-gen's own code (the first caller
outside torch lies in ``align_gen``, ``pipelines`` or ``reward_models``) during one update on
the CPU, where the same calls are made, and check that the count does not grow with the number
of denoising steps or minibatches. Reads inside the libraries we wrap are theirs (torch's AdamW
reads its step counter, a CPU tensor; transformers' attention masks read a flag).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from align_gen.config import load_config
from align_gen.train import assign_rewards, build_run, collect_rollouts, prepare_model, update

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tiny"
OUR_CODE = tuple(str(ROOT / package) for package in ("align_gen", "pipelines", "reward_models"))
TORCH = str(Path(torch.__file__).parent)
READS = frozenset({"item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__"})

# (config, settings): 2 denoising steps and one minibatch, against 4 steps and 4 minibatches
# (4 optimizer steps). Four rollouts in pairs, so every objective (REBEL's pairs included) runs.
SMALL = ["sample.num_steps=2", "sample.num_batches_per_epoch=1", "train.batch_size=4"]
LARGE = ["sample.num_steps=4", "sample.num_batches_per_epoch=2", "train.batch_size=2"]
COMMON = [
    "sample.batch_size=4",
    "train.gradient_accumulation_steps=1",
    "train.inner_epochs=1",
    "tensorboard=false",
]
CASES = {
    "ddpo-sd": ("ddpo_tiny_compressibility.yaml", ["sample.samples_per_prompt=2", "sample.guidance_scale=2.0"]),
    "ddpo-sd3": ("ddpo_tiny_sd3_compressibility.yaml", ["sample.samples_per_prompt=2"]),
    "rebel-sd": ("rebel_tiny_compressibility.yaml", ["sample.samples_per_prompt=2"]),
    "awm-sd": ("awm_tiny_compressibility.yaml", ["sample.samples_per_prompt=2"]),
    "seppo-sd": ("seppo_tiny_compressibility.yaml", []),
    "ddpo-llava": ("ddpo_tiny_vlm_colour.yaml", []),
}


class HostReads(TorchFunctionMode):
    """Counts the tensor-to-host reads whose first caller outside torch is align-gen's code, by
    (function, file:line)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(OUR_CODE):
                where = Path(frame.f_code.co_filename).relative_to(ROOT)
                self.sites[f"{func.__name__} at {where}:{frame.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def reads_in_one_update(tmp_path: Path, config_name: str, overrides: list[str]) -> HostReads:
    config = load_config(CONFIGS / config_name, [*overrides, f"output_dir={tmp_path}"])
    accelerator = Accelerator()
    run = build_run(config, accelerator)
    run.optimizer = prepare_model(run.policy, run.optimizer, config, accelerator)
    generator = torch.Generator().manual_seed(0)
    rollouts = collect_rollouts(run.policy, run.objective, run.prompts, config, generator, accelerator)
    assign_rewards(run, rollouts)
    with HostReads() as reads:
        update(run.policy, run.objective, run.optimizer, rollouts, config, generator, accelerator)
    return reads


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_an_update_reads_back_once_whatever_its_steps_and_minibatches(tmp_path: Path, case: str) -> None:
    config_name, settings = CASES[case]
    small = reads_in_one_update(tmp_path / "small", config_name, [*COMMON, *settings, *SMALL])
    large = reads_in_one_update(tmp_path / "large", config_name, [*COMMON, *settings, *LARGE])
    # One read of the pass's shuffled order (a CPU tensor) and one of all the statistics.
    assert large.count == small.count <= 2, (dict(small.sites), dict(large.sites))


def test_the_counter_sees_a_kernel_that_reads_back_every_step() -> None:
    """The control: the per-call DDIM kernel checks its timesteps on the host at every call (as
    ddpo-pytorch's does), so its reads grow with the steps; the grid's step table does not read."""
    from diffusers import DDIMScheduler

    from pipelines.kernels import DDIMStepTable, ddim_step_with_logprob

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    table = DDIMStepTable.from_scheduler(scheduler, eta=1.0)
    sample = torch.randn(2, 4, 8, 8)

    def reads(steps: int, use_table: bool) -> int:
        with HostReads() as counter:
            for i in range(steps):
                index = torch.full((2,), i)
                if use_table:
                    table.step(sample, index, sample)
                else:
                    ddim_step_with_logprob(scheduler, sample, scheduler.timesteps[index], sample)
        return counter.count

    assert reads(1, use_table=False) > 0 and reads(3, use_table=False) == 3 * reads(1, use_table=False)
    assert reads(1, use_table=True) == reads(3, use_table=True) == 0
