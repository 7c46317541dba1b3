"""Diffusers pipelines that sample with per-step log-probabilities, their transition kernels,
and labelled sample grids.

``StableDiffusionLogProbPipeline``, ``StableDiffusionXLLogProbPipeline``,
``StableDiffusion3LogProbPipeline`` and ``FluxLogProbPipeline`` extend diffusers' pipelines of the
same families: ``Pipeline.from_pretrained(...)`` (or ``.from_pipeline(pipe)``, sharing an
existing pipeline's weights) and ``pipe(prompts, ...)`` return the images, the whole latent
trajectory and every step's log-probability (:class:`LogProbPipelineOutput`). This package
stands alone: it needs torch and diffusers, not the align-gen trainer.
"""

import importlib
from typing import Any

# name -> its module; imported on first use, so that importing one module of the package (the
# kernels, the grid) does not import every diffusers pipeline.
_EXPORTS = {
    "AttentionBackendError": "pipelines.log_prob",
    "LogProbMixin": "pipelines.log_prob",
    "LogProbPipelineOutput": "pipelines.log_prob",
    "classifier_free_guidance": "pipelines.log_prob",
    "StableDiffusionLogProbPipeline": "pipelines.stable_diffusion",
    "StableDiffusionXLLogProbPipeline": "pipelines.stable_diffusion",
    "StableDiffusion3LogProbPipeline": "pipelines.flow",
    "FluxLogProbPipeline": "pipelines.flow",
    "render_grid": "pipelines.grid",
    "sample_grid": "pipelines.grid",
    "side_by_side": "pipelines.grid",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
