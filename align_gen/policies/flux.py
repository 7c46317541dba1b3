"""The FLUX.1 policy: the SD3 flow policy on :class:`~pipelines.FluxLogProbPipeline`.

Everything that makes a flow policy RL-trainable is inherited from
:class:`~align_gen.policies.flow.FlowPolicy` unchanged: the flow SDE kernel that both samples
and re-scores, the masked last step, ``noise_level = 0`` as the ODE, the velocity-space matching
loss, the reference model, the trainable weights and saving. What FLUX does differently (2x2
packed latents, T5 conditioning, distilled or true guidance, the resolution-dependent schedule)
lives in its pipeline; the policy keeps latents unpacked, (B, C, h, w), everywhere (trajectory,
``final_samples``, ``encode_samples``, the matching loss), so every objective is shared with the
other families. A guidance-distilled model (FLUX.1-dev) carries its guidance scale in the
conditioning (``guidance``), so the matching loss uses the sampling value.
"""

from __future__ import annotations

from align_gen.policies.flow import FlowPolicy
from pipelines.flow import FluxLogProbPipeline


class FluxPolicy(FlowPolicy):
    """A FluxPipeline behind the :class:`~align_gen.policy.Policy` protocol.

    ``model`` and its alias ``transformer`` are the FluxTransformer2DModel; latents are
    (B, C, h, w) VAE latents, packed only inside the pipeline's forward pass.
    """

    sampler_class = FluxLogProbPipeline

    def _check_schedule(self) -> None:
        """Any schedule: FLUX's sampler shifts it by the image's token count when it asks to."""

    @property
    def latent_multiple(self) -> int:
        return self.sampler.latent_multiple  # latents are packed in 2x2 patches

    @property
    def guidance_embedded(self) -> bool:
        return self.sampler.guidance_embedded

    @property
    def max_sequence_length(self) -> int:
        return self.sampler.max_sequence_length

    @property
    def true_cfg(self) -> bool:
        """Whether sampling runs classifier-free guidance with a negative prompt (2B passes)."""
        return self.sampler.true_cfg(self.sample_config.guidance_scale)
