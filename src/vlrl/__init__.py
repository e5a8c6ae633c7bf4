"""vlrl: reinforcement learning of vision-language models that reason, on PyTorch Lightning."""

__version__ = "0.1.0"
