import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker (``make test`` runs one per core) computes on one thread: two
    workers of two threads each on a 2-core machine would oversubscribe it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def tiny_train_overrides() -> list[str]:
    """Overrides that make any diffusion config train in about a second on a CPU: 2 DDIM steps,
    one batch of 2 rollouts per process, one epoch, a 1 x 1 grid, no TensorBoard."""
    return [
        "sample.num_steps=2",
        "sample.batch_size=2",
        "sample.num_batches_per_epoch=1",
        "sample.guidance_scale=1.5",
        "sample.samples_per_prompt=2",  # one pair or group; REBEL needs pairs
        "train.batch_size=2",
        "epochs=1",
        "grid.seeds=[0]",
        "grid.num_prompts=1",
        "grid.prompts=[]",
        "tensorboard=false",
    ]


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    """A .txt prompt file with two short prompts (one line each)."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


@pytest.fixture
def single_thread():
    """One intra-op torch thread for the test: the tiny models gain nothing from more, and on a
    shared 2-core machine two OpenMP threads per process oversubscribe it (measured 4x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on machines without CUDA (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def register_test_reward(monkeypatch):
    """``reward_models.register_reward``, on a copy of the registry that this test alone sees."""
    from reward_models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry.register_reward
