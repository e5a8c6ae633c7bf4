"""Loading a policy (or reasoner, critic backbone) from a Hugging Face directory or hub id.

``Policy`` is the component a method's YAML names: where the weights are, in which dtype, with
LoRA and/or 4-bit quantization, and what is frozen. ``Policy.load()`` returns the model and its
processor (a VLM) or tokenizer (a text model), through transformers' Auto classes, so any model
family transformers knows loads the same way.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from vlrl.errors import ConfigError
from vlrl.models.tiny import TINY_PREFIX, resolve_model_path

log = logging.getLogger(__name__)

# Module names (last path component) of vision encoders and projectors across model families.
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "mlp1", "vision_projection")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoRA:
    """LoRA adapter settings (peft).

    Args:
        rank: Adapter rank ``r``.
        alpha: Scaling numerator (``lora_alpha``); the update is scaled by ``alpha / rank``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``"all-linear"``.
        include_vision: Also adapt linear layers of the vision tower and projector.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    include_vision: bool = False


@dataclass
class Policy:
    """A model to load: weights, precision, adapters and what is frozen.

    Args:
        model_path: Hugging Face hub id or local directory (``tiny:qwen2_5_vl``, ``tiny:qwen2`` and
            ``tiny:llava_onevision`` build tiny random models offline). Checked before the weights load
            (``check_model_path``; ``lightning-cli`` checks every policy of the module at the start of fit).
        dtype: Parameter dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: Attention kernel passed to ``from_pretrained`` (``sdpa``, ``eager``,
            ``flash_attention_2``).
        lora: LoRA settings; ``None`` trains all (unfrozen) weights.
        quantization: ``nf4`` loads the base weights in 4-bit NF4 with bitsandbytes (QLoRA; needs ``lora``).
        freeze_vision: Freeze the vision tower and the projector (train the language model only).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        trust_remote_code: Allow model code shipped with the checkpoint to run. Off unless you trust it.
        min_pixels: Override the processor's minimum image size in pixels (Qwen-VL style processors).
        max_pixels: Override the processor's maximum image size in pixels.
    """

    model_path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: str = "sdpa"
    lora: LoRA | None = None
    quantization: Literal["nf4"] | None = None
    freeze_vision: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    _is_vlm: bool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.lora is None:
            raise ValueError(
                f"policy.quantization={self.quantization!r} needs policy.lora: 4-bit weights cannot be trained "
                "directly. Set policy.lora (e.g. `lora: {rank: 16}`) or remove quantization."
            )

    @property
    def path(self) -> str:
        return resolve_model_path(self.model_path)

    def load(self) -> tuple[torch.nn.Module, object]:
        """Load the model (with LoRA/quantization/freezing applied) and its processor or tokenizer."""
        check_model_path(self.model_path)
        path = self.path
        config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        self._is_vlm = getattr(config, "vision_config", None) is not None
        auto = AutoModelForImageTextToText if self._is_vlm else AutoModelForCausalLM
        kwargs = dict(
            dtype=DTYPES[self.dtype],
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
        )
        if self.quantization == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=DTYPES[self.dtype],
                bnb_4bit_use_double_quant=True,
            )
        model = auto.from_pretrained(path, **kwargs)
        processor = self.load_processor(path)
        if self.freeze_vision:
            freeze(vision_modules(model))
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.quantization == "nf4":
            keep_4bit_layout_trainable(model)
        if self.lora is not None:
            model = apply_lora(model, self.lora, quantized=self.quantization is not None)
        return model, processor

    def load_processor(self, path: str | None = None):
        path = path or self.path
        if self._is_vlm is None:
            self._is_vlm = (
                getattr(
                    AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code), "vision_config", None
                )
                is not None
            )
        if not self._is_vlm:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
            tok.padding_side = "left"
            return tok
        kwargs = {}
        if self.min_pixels is not None:
            kwargs["min_pixels"] = self.min_pixels
        if self.max_pixels is not None:
            kwargs["max_pixels"] = self.max_pixels
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=self.trust_remote_code, **kwargs)
        processor.tokenizer.padding_side = "left"
        return processor


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # ``name`` or ``owner/name``


def check_model_path(model_path: str, key: str = "policy.model_path") -> None:
    """Raise ``ConfigError`` at once unless ``model_path`` can be a model: a readable model folder or a hub id.

    A local folder must hold ``config.json``, and each ``*.safetensors`` file must open (its header is read,
    not its weights). A path that does not exist fails with "no such folder" when it cannot be a hub id
    (``owner/name``): an absolute or ``./`` path, more than one ``/``, or an ``owner`` that is a local
    folder. A hub id with ``HF_HUB_OFFLINE=1`` must be in the local Hugging Face cache. Otherwise the hub
    is asked when the weights load.
    """
    if model_path.startswith(TINY_PREFIX):
        return
    path = Path(model_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}={model_path!r} is not a model folder (no config.json in it); give the folder "
                "save_pretrained wrote, or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct"
            )
        for weights in sorted(path.glob("*.safetensors")):
            _check_safetensors(weights, key)
        return
    owner = model_path.split("/")[0]
    if not HUB_ID.match(model_path) or ".." in model_path or ("/" in model_path and Path(owner).is_dir()):
        raise ConfigError(
            f"{key}={model_path!r}: no such folder (relative to {Path.cwd()}); give an existing model folder, "
            "or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model_path, "config.json"), str):
        raise ConfigError(
            f"{key}={model_path!r}: no such folder, and not in the Hugging Face cache while HF_HUB_OFFLINE=1; "
            "download it first (huggingface-cli download), give a model folder, or unset HF_HUB_OFFLINE"
        )


def _check_safetensors(weights: Path, key: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own error types (SafetensorError, OSError)
        raise ConfigError(
            f"{key}: {weights} is not a readable safetensors file ({error}); download or save the model again"
        ) from error


def vision_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision tower and projector modules of a VLM (empty for a text model)."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        outermost = not any(name.startswith(f + ".") for f in found)
        if name.rsplit(".", 1)[-1] in VISION_MODULE_NAMES and outermost:
            found[name] = module
    return list(found.values())


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights in every ``Linear4bit`` of ``model``.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run in eval mode without gradients (a rollout) repacks its
    weight into an inference-only layout, and the next training forward takes a path autograd cannot go
    through. The policy alternates rollouts and updates, so it keeps the standard layout (GPUs never repack).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def freeze(modules: list[torch.nn.Module]) -> None:
    for module in modules:
        module.requires_grad_(False)


def apply_lora(model: torch.nn.Module, lora: LoRA, quantized: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    exclude = None if lora.include_vision else rf".*\.({'|'.join(VISION_MODULE_NAMES)})\..*"
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        exclude_modules=exclude,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def tokenizer_of(processor: ProcessorMixin | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return processor.tokenizer if isinstance(processor, ProcessorMixin) else processor


def pad_token_id(processor: ProcessorMixin | PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token."""
    tok = tokenizer_of(processor)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def stop_token_ids(model: torch.nn.Module, processor: ProcessorMixin | PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a response, sorted: the tokenizer's EOS and the model's generation-config EOS id(s)."""
    configured = model.generation_config.eos_token_id
    stop = {tokenizer_of(processor).eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return sorted(i for i in stop if i is not None)


def decode_responses(
    processor: ProcessorMixin | PreTrainedTokenizerBase, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> list[str]:
    """The texts of ``[N, T]`` right-padded responses, special tokens removed.

    Positions off ``response_mask`` are decoded as the pad token, which drops out as a special token
    (whatever id the padding holds, e.g. 0, would otherwise decode as a character).
    """
    padded = torch.where(response_mask.bool(), response_ids, pad_token_id(processor))  # [N, T]
    return tokenizer_of(processor).batch_decode(padded, skip_special_tokens=True)
