"""The critic of PPO: a language model (or VLM) backbone with a scalar value head.

``ValueModel`` is the transformer of a causal LM or a VLM without its LM head (for a VLM the vision
tower is part of it, so the critic sees the images the policy sees) followed by a linear head that
maps the last hidden state at every position to one number. ``load_value_model`` loads it from any
checkpoint ``Policy`` can load, with the same dtype, LoRA, quantization and freezing options: the
critic starts from the given weights (in PPO, the policy's checkpoint) plus a fresh head.

The head is zero-initialised, so the first values are exactly 0: with ``γ = λ = 1`` the first
advantages equal the returns, and the critic learns the reward scale from its first updates
instead of starting from the scale of a random projection.
"""

from __future__ import annotations

import torch

from vlrl.models.loading import Policy


class ValueModel(torch.nn.Module):
    """A backbone and a linear value head: ``forward(**model_inputs) -> [N, L]`` values.

    Args:
        backbone: The base model of a Hugging Face causal LM or VLM (what sits under its LM head:
            it takes the same inputs and returns ``last_hidden_state``).
        hidden_size: Width of the backbone's last hidden state.
    """

    def __init__(self, backbone: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(hidden_size, 1)  # float32: values are regression targets
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the backbone (floating-point inputs such as pixel values take it)."""
        return self.backbone.dtype

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Values ``[N, L]`` (float32) at every position of the input batch."""
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state  # [N, L, H]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # [N, L]


def load_value_model(spec: Policy) -> tuple[ValueModel, object]:
    """Load ``spec`` (LoRA, quantization and freezing applied) as a ``ValueModel`` and its processor.

    The LM head is dropped: only the backbone is kept, so its weights are neither trained nor saved.
    """
    model, processor = spec.load()
    hf_model = model.get_base_model() if spec.lora is not None else model  # under peft: the adapted HF model
    backbone = hf_model.base_model
    if backbone is hf_model:
        raise ValueError(
            f"critic {spec.model_path!r}: {type(hf_model).__name__} has no base model under an LM head "
            f"(attribute {hf_model.base_model_prefix!r}); give a causal LM or VLM checkpoint as the critic"
        )
    hidden_size = hf_model.config.get_text_config().hidden_size
    return ValueModel(backbone, hidden_size), processor
