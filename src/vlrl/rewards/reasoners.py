"""Frozen text-only reasoners: one batched protocol, three backends.

A reasoner answers chat prompts (each a list of ``{"role": ..., "content": str}`` messages) and
reports, per prompt, the text, why it stopped and how many tokens it generated. Methods that grade
a reasoner's answers (RACRO's caption reward, SOPHIA's trajectories) hand it every prompt of a step
in one ``generate`` call, so each backend can batch or parallelise as it sees fit:

- ``HFReasoner``: a Hugging Face model with ``generate``, on the training module's device (tests,
  small reasoners).
- ``VLLMReasoner``: a vLLM engine in the training process (GPU). vLLM is imported only when the
  engine starts.
- ``OpenAIReasoner``: any OpenAI-compatible ``/chat/completions`` endpoint (``vllm serve``, hosted
  APIs), over HTTP with bounded concurrency, timeouts and retries. The API key is read from an
  environment variable for each request and never kept.

Which backend runs is a config choice (``class_path``): a captioner trained with one reasoner is
evaluated with another by changing only the config.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from vlrl.models.inputs import collate, cut_at_stop, encode_prompt, to_device
from vlrl.models.loading import Policy, decode_responses, pad_token_id, stop_token_ids
from vlrl.models.tiny import resolve_model_path
from vlrl.rollout.base import Sampling, generation_config

__all__ = ["HFReasoner", "OpenAIReasoner", "Reasoner", "ReasonerError", "ReasonerOutput", "VLLMReasoner"]

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx


@dataclass
class ReasonerOutput:
    """One answer of a reasoner."""

    text: str  # the generated text (special tokens removed)
    finish_reason: str  # "stop" (ended by itself), "length" (truncated) or another reason a server gives
    num_tokens: int  # generated tokens (0 where a server does not report usage)


class ReasonerError(RuntimeError):
    """A reasoner could not answer: endpoint unreachable, HTTP error, malformed answer."""


@runtime_checkable
class Reasoner(Protocol):
    """Answers chat prompts in batches. Implementations: HFReasoner, VLLMReasoner, OpenAIReasoner."""

    def setup(self, device: torch.device) -> None:
        """Load the reasoner (once) and place it on ``device`` where that applies."""

    def generate(self, prompts: list[Messages], sampling: Sampling, seed: int | None = None) -> list[ReasonerOutput]:
        """One answer per prompt, in order (repeat a prompt k times for k answers)."""


class HFReasoner:
    """A Hugging Face model answering with ``generate``; its weights are frozen and never trained.

    The model is loaded by ``setup`` (on the training module's device), not by the constructor, so
    a config can name a large reasoner without loading it.

    Args:
        model_path: Hugging Face hub id or local directory of a causal LM, or of a VLM (text only, or
            shown images passed to ``generate``); ``tiny:qwen2`` builds a tiny random model offline.
        dtype: Parameter dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_batch_size: Most prompts per ``generate`` call (``None``: all at once).
        attn_implementation: Attention kernel passed to ``from_pretrained``.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """

    def __init__(
        self,
        model_path: str,
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        max_batch_size: int | None = None,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
    ) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1, or null for all prompts at once")
        self.source = Policy(
            model_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        self.max_batch_size = max_batch_size
        self.model: torch.nn.Module | None = None
        self.processor: Any = None

    def __repr__(self) -> str:
        return f"HFReasoner({self.source.model_path!r}, dtype={self.source.dtype!r})"

    def setup(self, device: torch.device) -> None:
        if self.model is None:
            model, self.processor = self.source.load()
            self.model = model.eval().requires_grad_(False)
            self.pad_id = pad_token_id(self.processor)
            self.stop_ids = stop_token_ids(self.model, self.processor)
        self.model.to(device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Messages],
        sampling: Sampling,
        seed: int | None = None,
        images: list[list[Image.Image]] | None = None,
    ) -> list[ReasonerOutput]:
        """One answer per prompt; ``images`` (a VLM only): each prompt's images, one ``{"type": "image"}``
        content part in its messages for each."""
        if self.model is None:
            raise RuntimeError("HFReasoner.generate called before setup(device)")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts")
        per_prompt = images if images is not None else [[] for _ in prompts]
        encoded = [encode_prompt(self.processor, m, imgs) for m, imgs in zip(prompts, per_prompt, strict=True)]
        size = self.max_batch_size or max(len(encoded), 1)
        device = next(self.model.parameters()).device
        outputs: list[ReasonerOutput] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(encoded), size):
                outputs.extend(self._generate(encoded[start : start + size], sampling, device))
        return outputs

    def _generate(self, prompts: list, sampling: Sampling, device: torch.device) -> list[ReasonerOutput]:
        batch = to_device(collate(prompts, self.pad_id), device, self.model.dtype)
        config = generation_config(sampling, self.stop_ids, self.pad_id)
        sequences = self.model.generate(**batch, generation_config=config)
        responses = sequences[:, batch["input_ids"].shape[1] :].cpu()  # [n, T]
        responses, mask, stopped = cut_at_stop(responses, self.stop_ids, self.pad_id)  # [n, T], [n, T], [n]
        texts = decode_responses(self.processor, responses, mask)
        return [
            ReasonerOutput(text=text, finish_reason="stop" if stop else "length", num_tokens=int(length))
            for text, stop, length in zip(texts, stopped.tolist(), mask.sum(dim=1).tolist(), strict=True)
        ]


class VLLMReasoner:
    """A vLLM engine in the training process (GPU): ``LLM.chat`` over all prompts of a step.

    vLLM is imported when ``setup`` starts the engine, so configs naming this class parse without
    it. The engine takes ``gpu_memory_utilization`` of the GPU it starts on (leave room for
    training); it uses vLLM's own device selection, not the module's.

    Args:
        model_path: Hugging Face hub id or local directory of the reasoner.
        dtype: Weight dtype for vLLM (``auto``, ``bfloat16``, ``float16``, ``float32``).
        gpu_memory_utilization: Fraction of GPU memory vLLM may take (weights and KV cache).
        tensor_parallel_size: GPUs the reasoner is split over.
        max_model_len: Longest prompt + answer in tokens (``None``: the model's own limit).
        enforce_eager: Disable CUDA graphs (slower, less memory, faster start).
        engine_kwargs: Further ``vllm.LLM`` arguments, e.g. ``{enable_prefix_caching: true}``.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1], e.g. 0.3")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1")
        self.model_path = model_path
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm: Any = None

    def __repr__(self) -> str:
        return f"VLLMReasoner({self.model_path!r})"

    def setup(self, device: torch.device) -> None:
        if self.llm is not None:
            return
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "VLLMReasoner needs vLLM (`pip install vllm` on a GPU machine); without it use "
                "vlrl.rewards.HFReasoner, or serve the reasoner with `vllm serve` and use vlrl.rewards.OpenAIReasoner"
            ) from error
        self.llm = LLM(
            model=resolve_model_path(self.model_path),
            dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            **self.engine_kwargs,
        )

    def generate(self, prompts: list[Messages], sampling: Sampling, seed: int | None = None) -> list[ReasonerOutput]:
        if self.llm is None:
            raise RuntimeError("VLLMReasoner.generate called before setup(device)")
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or -1,  # -1: no top-k (accepted by old and new vLLM alike)
                max_tokens=sampling.max_new_tokens,
                min_tokens=sampling.min_new_tokens,
                seed=None if seed is None else seed + i,  # distinct samples for repeated prompts
            )
            for i in range(len(prompts))
        ]
        results = self.llm.chat(prompts, sampling_params=params, use_tqdm=False)
        outputs = []
        for result in results:
            best = result.outputs[0]
            reason = best.finish_reason or "stop"
            outputs.append(ReasonerOutput(text=best.text, finish_reason=reason, num_tokens=len(best.token_ids)))
        return outputs


class _Retryable(Exception):
    """A failed attempt that may succeed if repeated (timeout, refused connection, 5xx)."""


class _Stopped(ReasonerError):
    """A request not sent (or not retried) because another request of the same batch failed."""


class OpenAIReasoner:
    """A reasoner behind an OpenAI-compatible chat-completions endpoint (e.g. ``vllm serve MODEL``).

    Each prompt is one ``POST {base_url}/chat/completions`` request (``n=1``; the seed, when given,
    is ``seed + i`` for the i-th prompt so repeated prompts get distinct samples); up to
    ``max_concurrency`` requests are in flight at once. A timeout, a refused or dropped connection
    or an HTTP 408/429/5xx answer is retried after ``backoff_s``, doubling each time; once
    ``max_retries`` are spent, or on any other HTTP error or an answer that is not a chat
    completion, ``generate`` raises ``ReasonerError`` naming the URL and what went wrong.

    Args:
        base_url: Endpoint root including the API version, e.g. ``http://localhost:8000/v1``.
        model: Model name the server serves (``vllm serve``'s model argument or
            ``--served-model-name``).
        api_key_env: Environment variable holding the API key, read for every request and sent as
            a Bearer token; if the variable is unset, no key is sent (a local ``vllm serve``
            without ``--api-key``). The key itself is never stored, logged or saved in configs.
        max_concurrency: Requests in flight at once.
        timeout_s: Socket timeout of one attempt (connecting, and each wait for data).
        max_retries: Further attempts after a retryable failure.
        backoff_s: Wait before the first retry; doubled for each further one.
        extra_body: Extra JSON fields sent with every request (e.g. ``{top_k: 20}`` or
            ``{chat_template_kwargs: {...}}`` for vLLM).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url={base_url!r} must start with http:// or https://, e.g. http://localhost:8000/v1"
            )
        if not isinstance(model, str) or not model.strip():
            raise ValueError(
                f"OpenAIReasoner.model={model!r} is empty: set it to the name the server serves (`vllm serve`'s "
                "model argument or --served-model-name; GET {base_url}/models lists them)"
            )
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency} must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 seconds")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(f"max_retries={max_retries} and backoff_s={backoff_s} must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"OpenAIReasoner({self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def setup(self, device: torch.device) -> None:
        """Nothing to load: the model runs on the server."""

    def generate(self, prompts: list[Messages], sampling: Sampling, seed: int | None = None) -> list[ReasonerOutput]:
        bodies = [
            self._body(messages, sampling, None if seed is None else seed + i) for i, messages in enumerate(prompts)
        ]
        if not bodies:
            return []
        failed = threading.Event()  # set by the first request that gives up: the others stop there
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies)), thread_name_prefix="reasoner")
        try:
            futures = [pool.submit(self._complete, body, failed) for body in bodies]
            pending = set(futures)
            while pending:  # return at the first real failure, not after the slowest request
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in futures:
                    if future in done and future.exception() and not isinstance(future.exception(), _Stopped):
                        raise future.exception()
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # requests still in flight end at their timeout

    def _body(self, messages: Messages, sampling: Sampling, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "n": 1,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # a vLLM extension: sent only when asked for
        if sampling.min_new_tokens > 0:
            body["min_tokens"] = sampling.min_new_tokens  # likewise
        if seed is not None:
            body["seed"] = seed
        return {**body, **self.extra_body}

    def _complete(self, body: dict[str, Any], failed: threading.Event) -> ReasonerOutput:
        """One request, retried on retryable failures; raises ``ReasonerError`` when it gives up."""
        failures = []
        try:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                if failed.is_set():
                    raise _Stopped(f"{self.url}: request dropped because another request of the batch failed")
                try:
                    return self._parse(self._post(body))
                except _Retryable as failure:
                    failures.append(str(failure))
                    log.debug("reasoner request to %s failed (attempt %d): %s", self.url, attempt + 1, failure)
            hint = " Is the server running and base_url right?" if failures[-1].startswith("cannot connect") else ""
            raise ReasonerError(
                f"{self.url}: no answer after {len(failures)} attempt(s) (timeout_s={self.timeout_s}, "
                f"max_retries={self.max_retries}); last failure: {failures[-1]}.{hint}"
            )
        except ReasonerError:
            failed.set()
            raise

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: dict[str, Any]) -> bytes:
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = _snippet(_read_quietly(error))
            if error.code in RETRY_STATUS or error.code >= 500:
                raise _Retryable(f"HTTP {error.code}: {detail}") from None
            raise ReasonerError(f"{self.url} answered HTTP {error.code}: {detail}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.timeout_s} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout_s} s") from None
            raise _Retryable(f"cannot connect ({error.reason})") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"connection dropped ({type(error).__name__}: {error})") from None

    def _parse(self, raw: bytes) -> ReasonerOutput:
        try:
            data = json.loads(raw)
        except ValueError:
            raise ReasonerError(
                f"{self.url} answered malformed JSON ({_snippet(raw)}); is base_url an OpenAI-compatible "
                "endpoint such as http://localhost:8000/v1?"
            ) from None
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ReasonerError(
                f"{self.url} answered JSON that is not a chat completion (no choices[0].message): {_snippet(raw)}"
            ) from None
        usage = data.get("usage") or {}
        return ReasonerOutput(
            text=text,
            finish_reason=choice.get("finish_reason") or "stop",
            num_tokens=int(usage.get("completion_tokens") or 0),
        )


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text) + (" ..." if len(raw) > limit else "")
