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
  APIs), over HTTP with bounded concurrency. The API key is read from an environment variable for
  each request and never kept.

Served models fail, and one fault model covers every reward that asks one (captions, trajectories,
judges): a server that is down is retried with backoff for up to an outage budget (minutes, so that
a restart fits in); past it ``ReasonerUnavailable`` is raised, which the reward runner and the
methods re-raise instead of scoring 0, so the step stops and the run checkpoints. Requests still in
flight are abandoned (daemon threads), so the process exits at once instead of waiting for them.
On several ranks, ``agreed`` makes every rank stop at the same step. A request is never sent past
the server's context: its answer budget is shortened to fit, and a prompt that cannot fit at all is
answered empty (truncated, so it scores 0) and counted.

Reasoning models are first-class: where the chat template opens ``<think>`` itself (QwQ,
DeepSeek-R1-Distill) the opening is restored, and reasoning that a server's reasoning parser splits
off (``reasoning_content``) is put back, so every backend returns whole trajectories
(``whole_trajectory``).

Which backend runs is a config choice (``class_path``): a captioner trained with one reasoner is
evaluated with another by changing only the config.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import torch
from PIL import Image

from vlrl.errors import AllRanksError
from vlrl.models.inputs import collate, cut_at_stop, encode_prompt, to_device
from vlrl.models.loading import Policy, decode_responses, pad_token_id, stop_token_ids
from vlrl.models.tiny import resolve_model_path
from vlrl.rewards.functions import RewardUnavailable
from vlrl.rollout.base import Sampling, generation_config

__all__ = [
    "HFReasoner",
    "OpenAIReasoner",
    "Reasoner",
    "ReasonerError",
    "ReasonerOutput",
    "ReasonerStopped",
    "ReasonerUnavailable",
    "VLLMReasoner",
    "agreed",
    "thinks",
    "whole_trajectory",
]

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
T = TypeVar("T")
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ReasonerOutput:
    """One answer of a reasoner."""

    text: str  # the generated text (special tokens removed)
    finish_reason: str  # "stop" (ended by itself), "length" (truncated) or another reason a server gives
    num_tokens: int  # generated tokens (0 where a server does not report usage)
    shortened: bool = False  # the answer budget was cut to fit the server's context


class ReasonerError(RuntimeError):
    """A reasoner could not answer: endpoint unreachable, HTTP error, malformed answer."""


class ReasonerUnavailable(ReasonerError, RewardUnavailable):
    """The reasoner's server stayed unreachable past the outage budget.

    A ``RewardUnavailable``: the reward runner re-raises it instead of scoring the samples 0, so
    the step stops (and the run checkpoints) rather than training on rewards of a dead server.
    """


class ReasonerStopped(ReasonerError, AllRanksError):
    """Raised on every rank at once (``agreed``) because the reasoner of one rank or more gave up.

    An ``AllRanksError``: every rank raises it at the same point of the step, so the exception
    handler (``vlrl.callbacks.Preemption``) can take part in a collective save of the last completed step.
    """


def think_prefix(rendered_prompt: str) -> str:
    """The ``<think>`` opening a chat template put at the end of ``rendered_prompt`` (``""`` if none).

    QwQ-32B and DeepSeek-R1-Distill templates end the generation prompt with ``<think>\\n``: the
    model's answer then starts inside the think block, and the opening is not in its text.
    """
    start = rendered_prompt.rfind(THINK_OPEN)
    if start < 0 or rendered_prompt[start:].strip() != THINK_OPEN:
        return ""
    return rendered_prompt[start:]


def whole_trajectory(content: str, reasoning: str | None = None, prefix: str = "") -> str:
    """The whole trajectory of a reasoning model from what a backend returned.

    Args:
        content: The answer text (after the think block where a reasoning parser split it off).
        reasoning: The reasoning a server's reasoning parser returned apart (``reasoning_content``).
        prefix: The ``<think>`` opening the chat template supplied (``think_prefix``).

    Examples:
        ``whole_trajectory("Count.\\n</think>\\n\\n3", prefix="<think>\\n")`` and
        ``whole_trajectory("\\n\\n3", reasoning="Count.\\n")`` both give
        ``"<think>\\nCount.\\n</think>\\n\\n3"``; without a prefix, an answer that closes a think
        block it never opened (``"Count.</think> 3"``) gets ``"<think>\\n"`` in front.
    """
    if reasoning:
        if not content:  # cut off while still thinking: the block stays open
            return f"{THINK_OPEN}\n{reasoning.strip()}"
        return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content.lstrip()}"
    if content.lstrip().startswith(THINK_OPEN):
        return content
    if prefix:
        return prefix + content
    if THINK_CLOSE in content:  # closed but never opened: the template opened it
        return f"{THINK_OPEN}\n{content}"
    return content


def thinks(text: str) -> bool:
    """True if ``text`` is a long-CoT trajectory: it opens with a ``<think>`` block and closes it."""
    text = text.lstrip()
    return text.startswith(THINK_OPEN) and THINK_CLOSE in text


def agreed(call: Callable[[], T], device: torch.device) -> T:
    """``call()`` on every rank; if it raised ``ReasonerError`` on any rank, every rank raises ``ReasonerStopped``.

    A rank whose reasoner gave up must not leave the others waiting in the next collective until
    the process-group timeout: after the call, each rank reports whether it failed (an all-reduce
    of the flag with ``max`` over the default process group, on ``device``) and all stop together,
    so an exception handler can checkpoint. Without a process group it is just ``call()`` (its
    error raised as it is).

    Args:
        call: The reasoner call of this rank.
        device: Where the flag is reduced (the module's device: CUDA under NCCL, CPU under gloo).
    """
    try:
        result, error = call(), None
    except ReasonerError as caught:
        result, error = None, caught
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return result
    flag = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise ReasonerStopped(f"{type(error).__name__}: {error}") from error
    if flag.item() > 0:
        raise ReasonerStopped(
            "the reasoner of another rank gave up (its error is in that rank's log): every rank stops"
        )
    return result


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
        prefixes = [
            think_prefix(self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False))
            for m in prompts
        ]
        return [replace(o, text=whole_trajectory(o.text, prefix=p)) for o, p in zip(outputs, prefixes, strict=True)]

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
    it. The engine starts on the training module's device (``setup(device)``: each rank's own GPU;
    under several ranks through vLLM's external launcher, as ``vlrl.rollout.VLLMEngine`` does) and
    takes ``gpu_memory_utilization`` of it (leave room for training).

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
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)  # vLLM places its workers on the current device
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                os.environ.setdefault("RANK", str(dist.get_rank()))
                os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
                os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
                kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank, on its GPU
        self.llm = LLM(
            model=resolve_model_path(self.model_path),
            dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            **{**kwargs, **self.engine_kwargs},
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
        tokenizer = self.llm.get_tokenizer()
        outputs = []
        for messages, result in zip(prompts, results, strict=True):
            best = result.outputs[0]
            prefix = think_prefix(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            text = whole_trajectory(best.text, prefix=prefix)
            outputs.append(ReasonerOutput(text, best.finish_reason or "stop", num_tokens=len(best.token_ids)))
        return outputs


class _Retryable(Exception):
    """A failed attempt that may succeed if repeated (timeout, refused or dropped connection, 408/429/5xx)."""


class _Malformed(Exception):
    """An answer that is not a chat completion (a body cut short, not JSON): retried a few times."""


class _Stopped(ReasonerError):
    """A request not sent (or not retried) because another request of the same batch failed."""


class OpenAIReasoner:
    """A reasoner behind an OpenAI-compatible chat-completions endpoint (e.g. ``vllm serve MODEL``).

    Repeated prompts (``k`` answers of one caption) go as one ``POST {base_url}/chat/completions``
    with ``n=k`` (at most ``max_n``); every other prompt as its own request, with seed ``seed + i``
    for the i-th prompt. Up to ``max_concurrency`` requests are in flight at once.

    The fault model: a timeout, a refused or dropped connection or an HTTP 408/429/5xx answer is
    retried after ``backoff_s``, doubling up to ``max_backoff_s``, for as long as the server has
    been failing less than ``outage_budget_s``; then ``generate`` raises ``ReasonerUnavailable``
    (which stops the step instead of scoring it 0) naming the URL, the budget and the fix. An
    answer that is not a chat completion is retried ``malformed_retries`` times; any other HTTP
    error raises ``ReasonerError`` at once. The first request that gives up stops the others:
    nothing more is sent, and requests in flight are abandoned (they run on daemon threads), so the
    process can exit at once.

    Context: ``setup`` reads the server's ``max_model_len`` from ``GET {base_url}/models`` (vLLM
    reports it; ``max_model_len`` overrides it). With ``tokenizer`` set, each prompt is counted with
    the served model's chat template, and a request whose prompt + ``max_tokens`` would exceed the
    context gets a shorter ``max_tokens`` (``ReasonerOutput.shortened``); a prompt that leaves no
    room is not sent and answers empty, truncated. The same template tells whether the model's
    answer starts inside a ``<think>`` block the template opened; the opening, and any reasoning a
    reasoning parser returns apart (``reasoning_content``), are put back into the text.

    Args:
        base_url: Endpoint root including the API version, e.g. ``http://localhost:8000/v1``.
        model: Model name the server serves (``vllm serve``'s model argument or
            ``--served-model-name``).
        api_key_env: Environment variable holding the API key, read for every request and sent as
            a Bearer token; if the variable is unset, no key is sent (a local ``vllm serve``
            without ``--api-key``). The key itself is never stored, logged or saved in configs.
        max_concurrency: Requests in flight at once.
        timeout_s: Socket timeout of one attempt (connecting, and each wait for data).
        outage_budget_s: How long a server may keep failing before the run stops (seconds since a
            request's first failed attempt). Ten minutes by default, which a ``vllm serve``
            restart fits in. On several ranks keep it (plus ``timeout_s`` of a hung request) below
            the process group's timeout, 30 minutes by default.
        max_retries: Most further attempts of one request within the budget (null: as many as
            the budget allows).
        backoff_s: Wait before the first retry; doubled for each further one.
        max_backoff_s: Longest wait between two attempts.
        malformed_retries: Further attempts after an answer that is not a chat completion.
        max_n: Most answers one request asks for (``n``); 1 for servers without ``n``.
        tokenizer: Hugging Face id or directory of the served model's tokenizer (usually the same
            as ``model``), loaded by ``setup``: counts prompt tokens against the context and shows
            whether the chat template opens ``<think>``. Null: prompts are not counted (a request
            the server finds too long fails with a clear error) and an answer that closes a
            ``</think>`` it never opened gets the opening back.
        max_model_len: The server's context in tokens (prompt + answer); null: what
            ``GET /models`` reports (vLLM's ``--max-model-len``), else unchecked.
        extra_body: Extra JSON fields sent with every request (e.g. ``{top_k: 20}`` or
            ``{chat_template_kwargs: {...}}`` for vLLM; the latter is also applied when counting).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        outage_budget_s: float = 600.0,
        max_retries: int | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        malformed_retries: int = 2,
        max_n: int = 16,
        tokenizer: str | None = None,
        max_model_len: int | None = None,
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
        if outage_budget_s < 0:
            raise ValueError(f"outage_budget_s={outage_budget_s} must be >= 0 seconds, e.g. 600 (a server restart)")
        if (max_retries is not None and max_retries < 0) or backoff_s < 0 or malformed_retries < 0:
            raise ValueError(
                f"max_retries={max_retries}, backoff_s={backoff_s} and malformed_retries={malformed_retries} "
                "must be >= 0"
            )
        if max_backoff_s < backoff_s:
            raise ValueError(f"max_backoff_s={max_backoff_s} must be >= backoff_s={backoff_s}")
        if max_n < 1:
            raise ValueError(f"max_n={max_n} must be >= 1 (1: one answer per request)")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len={max_model_len} must be >= 1 tokens, or null to ask the server")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.outage_budget_s = outage_budget_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.malformed_retries = malformed_retries
        self.max_n = max_n
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.extra_body = dict(extra_body or {})
        self.template: Any = None  # the served model's tokenizer, loaded by setup
        self.ready = False

    def __repr__(self) -> str:
        return f"OpenAIReasoner({self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # ------------------------------------------------------------------------------ setup
    def setup(self, device: torch.device) -> None:
        """Load the tokenizer (if named) and read the served model's context from ``GET /models`` (once)."""
        if self.ready:
            return
        if self.tokenizer is not None:
            from transformers import AutoTokenizer

            self.template = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer))
        if self.max_model_len is None:
            self.max_model_len = self.served_context()
        self.ready = True

    def served_context(self) -> int | None:
        """``max_model_len`` of ``model`` in ``GET {base_url}/models`` (None where the server gives none)."""
        url = f"{self.base_url}/models"
        try:
            data = self._attempts(url, lambda: _json(self._send(url, None)), threading.Event())
        except ReasonerUnavailable:
            raise
        except ReasonerError as error:
            log.info("%s lists no models (%s): the context is not checked; set max_model_len to check it", url, error)
            return None
        listed = data.get("data") if isinstance(data, dict) else None
        entries = {m.get("id"): m for m in listed or [] if isinstance(m, dict)}
        if self.model not in entries:
            raise ValueError(
                f"OpenAIReasoner.model={self.model!r} is not served at {self.base_url}: it serves {sorted(entries)}; "
                "set model to one of them (vllm serve's model argument or --served-model-name)"
            )
        length = entries[self.model].get("max_model_len")
        return int(length) if length else None

    def prompt_tokens(self, messages: Messages) -> int | None:
        """Tokens of ``messages`` rendered with the served model's chat template (None without ``tokenizer``)."""
        rendered = self._render(messages)
        return None if rendered is None else len(self.template(rendered, add_special_tokens=False)["input_ids"])

    def _render(self, messages: Messages) -> str | None:
        if self.template is None:
            return None
        kwargs = self.extra_body.get("chat_template_kwargs") or {}
        return self.template.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    # --------------------------------------------------------------------------- generate
    def generate(self, prompts: list[Messages], sampling: Sampling, seed: int | None = None) -> list[ReasonerOutput]:
        self.setup(torch.device("cpu"))  # once: a no-op after the module's setup
        runs = []  # (first prompt, answers): runs of equal prompts, one request each
        for i, messages in enumerate(prompts):
            if runs and runs[-1][1] < self.max_n and prompts[runs[-1][0]] == messages:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
        jobs = [
            lambda stop, i=i, n=n: self._answer(prompts[i], n, sampling, None if seed is None else seed + i, stop)
            for i, n in runs
        ]
        return [output for answers in self._run(jobs) for output in answers]

    def _run(self, jobs: list[Callable[[threading.Event], T]]) -> list[T]:
        """Every job on up to ``max_concurrency`` daemon threads; the first failure is raised at once."""
        results: list[Any] = [None] * len(jobs)
        errors: list[BaseException] = []
        queue = iter(range(len(jobs)))
        lock, stop, finished = threading.Lock(), threading.Event(), threading.Event()
        left = [len(jobs)]

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                try:
                    results[i] = jobs[i](stop)
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    with lock:
                        errors.append(error)
                    stop.set()
                    finished.set()
                    return
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        finished.set()

        if not jobs:
            return []
        try:
            for _ in range(min(self.max_concurrency, len(jobs))):
                threading.Thread(target=worker, name="reasoner", daemon=True).start()
            while not finished.wait(0.5):  # a timed wait: Ctrl-C reaches this thread
                pass
        finally:
            stop.set()  # nothing more is sent; requests in flight are abandoned with their daemon threads
        if errors:
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return results

    def _answer(
        self, messages: Messages, n: int, sampling: Sampling, seed: int | None, stop: threading.Event
    ) -> list[ReasonerOutput]:
        """``n`` answers to one prompt: one request, its answer budget fitted to the context."""
        rendered = self._render(messages)
        budget, shortened = sampling.max_new_tokens, False
        if rendered is not None and self.max_model_len is not None:
            room = self.max_model_len - len(self.template(rendered, add_special_tokens=False)["input_ids"])
            budget, shortened = min(budget, room), room < budget
            if budget < 1:  # the prompt alone fills the context: never sent, scored as truncated
                log.warning(
                    "a reasoner prompt fills the context of %s (max_model_len=%d): not sent",
                    self.url,
                    self.max_model_len,
                )
                return [ReasonerOutput("", "length", 0, shortened=True) for _ in range(n)]
        body = self._body(messages, sampling, budget, n, seed)
        data = self._attempts(self.url, lambda: self._parse(self._send(self.url, body), n, body["max_tokens"]), stop)
        prefix = think_prefix(rendered) if rendered is not None else ""
        return [
            replace(output, text=whole_trajectory(output.text, reasoning, prefix), shortened=shortened)
            for output, reasoning in data
        ]

    def _body(
        self, messages: Messages, sampling: Sampling, max_tokens: int, n: int, seed: int | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # a vLLM extension: sent only when asked for
        if sampling.min_new_tokens > 0:
            body["min_tokens"] = min(sampling.min_new_tokens, max_tokens)  # likewise
        if seed is not None:
            body["seed"] = seed
        return {**body, **self.extra_body}

    # ------------------------------------------------------------------------ fault model
    def _attempts(self, url: str, attempt: Callable[[], T], stop: threading.Event) -> T:
        """``attempt()`` until it succeeds, retried within the outage budget; raises when it gives up."""
        tries, malformed, first_failure, last = 0, 0, None, ""
        while True:
            if stop.is_set():
                raise _Stopped(f"{url}: request dropped because another request of the batch failed")
            tries += 1
            try:
                return attempt()
            except _Malformed as failure:
                malformed, last = malformed + 1, str(failure)
                if malformed > self.malformed_retries:
                    raise ReasonerError(
                        f"{url} answered {malformed} time(s) with {last}; is base_url an OpenAI-compatible endpoint "
                        "such as http://localhost:8000/v1?"
                    ) from None
            except _Retryable as failure:
                last = str(failure)
                first_failure = time.monotonic() if first_failure is None else first_failure
                failing = time.monotonic() - first_failure
                if failing >= self.outage_budget_s or (self.max_retries is not None and tries > self.max_retries):
                    hint = " Is the server running and base_url right?" if last.startswith("cannot connect") else ""
                    raise ReasonerUnavailable(
                        f"{url}: no answer after {tries} attempt(s) over {failing:.0f} s (outage_budget_s="
                        f"{self.outage_budget_s:g}, max_retries={self.max_retries}, timeout_s={self.timeout_s:g}); "
                        f"last failure: {last}.{hint} To wait longer for the server (e.g. a restart), raise "
                        "outage_budget_s (on several ranks, below the process-group timeout)."
                    ) from None
            log.debug("request to %s failed (attempt %d): %s", url, tries, last)
            left = math.inf if first_failure is None else self.outage_budget_s - (time.monotonic() - first_failure)
            delay = max(min(self.backoff_s * 2 ** (tries - 1), self.max_backoff_s, left), 0.0)
            if stop.wait(delay):
                raise _Stopped(f"{url}: request dropped because another request of the batch failed")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _send(self, url: str, body: dict[str, Any] | None) -> bytes:
        """One attempt: POST ``body`` (GET without one); the raw answer, or ``_Retryable`` / ``ReasonerError``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = _snippet(_read_quietly(error))
            if error.code in RETRY_STATUS or error.code >= 500:
                raise _Retryable(f"HTTP {error.code}: {detail}") from None
            hint = ""
            if error.code == 400 and body is not None and "context" in detail.lower():
                hint = (
                    f" (the request is longer than the server's context: set tokenizer: {self.model} so each request's "
                    "max_tokens is fitted, or serve with a larger --max-model-len)"
                )
            raise ReasonerError(f"{url} answered HTTP {error.code}: {detail}{hint}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
            raise _Retryable(f"cannot connect ({error.reason})") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"connection dropped ({type(error).__name__}: {error})") from None

    def _parse(self, raw: bytes, n: int, max_tokens: int) -> list[tuple[ReasonerOutput, str | None]]:
        """The ``n`` answers of a chat completion, each with the reasoning a reasoning parser split off.

        With ``n > 1`` and no tokenizer, usage gives only the total: each answer's count is its share
        of it by characters, kept within [1, ``max_tokens``] for a non-empty answer (an estimate).
        """
        data = _json(raw)
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            messages = [c["message"] for c in choices]
            texts = [m.get("content") or "" for m in messages]
            reasonings = [m.get("reasoning_content") or m.get("reasoning") for m in messages]
        except (KeyError, TypeError, AttributeError):
            raise _Malformed(f"JSON that is not a chat completion (no choices[].message): {_snippet(raw)}") from None
        if len(choices) != n:
            raise _Malformed(f"{len(choices)} choices for n={n}: {_snippet(raw)}")
        total = int((data.get("usage") or {}).get("completion_tokens") or 0)
        whole = [t + (r or "") for t, r in zip(texts, reasonings, strict=True)]
        if n == 1:
            counts = [total]
        elif self.template is not None:  # usage sums the n answers: count each
            counts = [len(self.template(t, add_special_tokens=False)["input_ids"]) for t in whole]
        else:  # no tokenizer: share the total out by characters
            chars = sum(len(t) for t in whole) or 1
            counts = [min(max(round(total * len(t) / chars), int(bool(t))), max_tokens) for t in whole]
        return [
            (ReasonerOutput(text, c.get("finish_reason") or "stop", count), reasoning)
            for text, reasoning, c, count in zip(texts, reasonings, choices, counts, strict=True)
        ]


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise _Malformed(f"malformed JSON ({_snippet(raw)})") from None


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text) + (" ..." if len(raw) > limit else "")
