"""align-gen: align generative models with reinforcement learning behind one likelihood interface."""

__version__ = "0.1.0"
