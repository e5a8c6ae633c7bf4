"""Seconds per GRPO step: vlrl against TRL's ``GRPOTrainer`` on the same tiny VLM, prompts and settings.

Both trainers run the same algorithm on the same inputs, one after the other in fresh subprocesses
(so each has its own peak memory), alternating for ``--rounds`` rounds so that the load of the
machine affects both alike:

- the same tiny random Qwen2.5-VL (built once into a temporary folder; both load it by path), by
  default with the real 151k-token Qwen2.5 vocabulary from ``shared/data`` (``--tiny-vocab``: 1k
  tokens), the same float precision, the same torch thread count (default 1: on a busy machine
  several threads per process mostly wait for each other), HF ``generate`` on both sides (no vLLM);
- the same prompts in the same order (synthetic shapes questions with one image each, rendered by
  ``vlrl.data``), ``B`` prompts × ``G`` samples per step, sampled at temperature 1, top-p 1, no
  top-k, up to ``max_new_tokens`` tokens, vision special tokens suppressed;
- the same reward (the fraction of vowels in the response, one Python function wrapped for each);
- advantages ``r − mean(group)`` (vlrl ``advantage: mean``, TRL ``scale_rewards: none``), clipped
  ratio with ε = 0.2, loss summed over all response tokens of the step and divided by their count
  (vlrl ``loss_aggregation: token-mean``, TRL ``loss_type: dapo``), no KL (β = 0: no reference),
  one epoch (``num_iterations`` 1), one optimizer step per rollout in micro-batches of ``micro``
  samples (TRL: ``per_device_train_batch_size`` = ``micro``, gradient accumulation =
  ``steps_per_generation`` = ``B·G/micro``), AdamW (β 0.9/0.999, ε 1e-8, no weight decay) at a
  constant learning rate, gradient norm clipped at 1.

Besides time, every run counts the work of a step with forward hooks on the model (the same hooks on
both trainers): vision-tower calls and the images they encode, the positions the language model sees
during the rollout's prefill (every position of the first pass of each ``generate`` call and of any
pass over more than one token before it), and the positions of the training forwards (log-probs and
the update; vlrl runs a group's prompt once, ``prompt_once``) with their padded fraction (a packed
forward has none). ``--packed`` adds vlrl with
padding-free (packed) training forwards (``packing``; ``--max-tokens-per-micro-batch`` cuts them by
a token budget), so the padded fraction shows before and after packing. ``--baseline REF`` adds vlrl
as it was at the git revision ``REF`` (its ``src`` exported into a temporary folder and put first on
the path), so one run shows vlrl before and after a change against TRL. ``--group-sizes`` and ``--vocabs`` run a grid of
settings, one model per vocabulary, and print one table.

A step's time is the wall time between the ends of consecutive optimizer steps (data loading,
rollout, rewards, update: everything); the first ``--warmup`` steps of every run are dropped and
the median of the rest is reported. ``--profile`` adds vlrl's time per phase (prompt encoding,
``generate``, decoding, rewards, log-prob forward passes, backward, optimizer).

Run (needs the ``bench`` extra: ``pip install -e .[bench]``)::

    python benchmarks/speed.py                                   # CPU, float32, the default settings
    python benchmarks/speed.py --steps 4 --warmup 1 --rounds 2 --profile --out benchmarks/results/speed_after.json
    python benchmarks/speed.py --tiny-vocab --threads 2 --steps 6 --warmup 2
    python benchmarks/speed.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8 --max-new-tokens 128
    python benchmarks/speed.py --group-sizes 4 8 --vocabs tiny real --baseline ba0c2c5 --packed --steps 3 --warmup 1 \
        --rounds 2 --max-new-tokens 64 --threads 1 --out benchmarks/results/speed_grid.json   # before/after/TRL table
    python benchmarks/speed.py --tiny-vocab --packed --steps 1 --warmup 1 --rounds 1 --only vlrl   # padded vs packed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MARKER = "SPEED_RESULT "
REAL_VOCAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "qwen2.5"
PROMPT_TEMPLATE = "{question}\nPut your final answer within \\boxed{{}}."


@dataclass
class Settings:
    """What both trainers run with (printed, and saved in the JSON)."""

    model_dir: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    prompts_per_step: int = 4
    group_size: int = 4
    micro_batch_size: int = 8
    max_new_tokens: int = 32
    image_size: int = 112
    learning_rate: float = 1e-5
    epsilon: float = 0.2
    max_grad_norm: float = 1.0
    steps: int = 6
    warmup: int = 2
    seed: int = 0
    profile: bool = False
    max_tokens_per_micro_batch: int | None = None  # the packed vlrl run's token budget (None: micro_batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps + self.warmup


def vowel_fraction(texts: list[str]) -> list[float]:
    """The reward of both trainers: the fraction of a response's characters that are vowels."""
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]


def data_module(settings: Settings) -> Any:
    """vlrl's data module over the prompts of the whole run, in order (synthetic rows, one image each)."""
    from vlrl.data import RLDataModule, Synthetic

    size = settings.prompts_per_step * settings.total_steps
    return RLDataModule(
        train=Synthetic("train", size=size, seed=settings.seed, image_size=settings.image_size),
        batch_size=settings.prompts_per_step,
        prompt_template=PROMPT_TEMPLATE,
        shuffle=False,
    )


def prompt_rows(settings: Settings) -> list[Any]:
    """The prompts of the whole run, in order, exactly as vlrl's data module yields them (messages + images)."""
    dataset = data_module(settings).dataset("train")
    return [dataset[i] for i in range(len(dataset))]


def step_times(ends: list[float], warmup: int) -> list[float]:
    """Durations of the steps after ``warmup`` from the times steps ended (the first from the run start)."""
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :], strict=False)]


# ------------------------------------------------------------------------------------------ counters
class WorkCounter:
    """Work of the steps of one run, counted by forward hooks on the policy (vlrl and TRL alike).

    ``rollout(fn)`` wraps whatever runs a rollout, so that the language-model passes inside it count as
    prefill (the first pass of each ``generate`` and every pass over more than one position) and those
    outside it as training forwards (positions and padded positions, from their attention mask).
    """

    def __init__(self) -> None:
        self.vision_calls = 0
        self.images = 0
        self.prefill_tokens = 0
        self.train_tokens = 0
        self.train_padded = 0
        self.in_rollout = False
        self.first_pass = False

    def attach(self, model: Any) -> None:
        from peft import PeftModel

        from vlrl.models.loading import vision_modules  # present at every baseline revision too

        base = model.get_base_model() if isinstance(model, PeftModel) else model
        towers = vision_modules(base)
        if towers:
            towers[0].register_forward_pre_hook(self.on_vision, with_kwargs=True)
        inner = base.model
        lm = getattr(inner, "language_model", inner)
        lm.register_forward_pre_hook(self.on_language_model, with_kwargs=True)

    def rollout(self, fn):
        def wrapper(*args, **kwargs):
            self.in_rollout, self.first_pass = True, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_rollout = False

        return wrapper

    def on_vision(self, module, args, kwargs) -> None:
        self.vision_calls += 1
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)  # Qwen-VL: one row per image
        self.images += (
            int(grid.shape[0]) if grid is not None else int((args[0] if args else kwargs["pixel_values"]).shape[0])
        )

    def on_language_model(self, module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        rows, length = (embeds if embeds is not None else kwargs["input_ids"]).shape[:2]
        if self.in_rollout:
            if self.first_pass or length > 1:
                self.prefill_tokens += rows * length
            self.first_pass = False
            return
        mask = kwargs.get("attention_mask")
        self.train_tokens += rows * length
        if mask is not None and mask.dim() == 2:  # a pass reading a cache has a mask over cache + its positions
            self.train_padded += rows * length - int(mask[:, -length:].sum())

    def per_step(self, steps: int) -> dict[str, float]:
        return {
            "vision_calls": self.vision_calls / steps,
            "images_encoded": self.images / steps,
            "prefill_tokens": self.prefill_tokens / steps,
            "padded_frac": self.train_padded / max(self.train_tokens, 1),
            "train_tokens": self.train_tokens / steps,
        }


# ------------------------------------------------------------------------------------------- vlrl
def run_vlrl(settings: Settings, packed: bool = False) -> dict[str, Any]:
    """vlrl's GRPO; ``packed``: padding-free training forwards (``packing``), cut by the token budget if set."""
    import lightning.pytorch as pl
    import torch

    from vlrl.methods import GRPO
    from vlrl.models import Policy
    from vlrl.rewards import RewardFunction
    from vlrl.rollout import Sampling

    class VowelReward(RewardFunction):
        def __call__(self, completions, **kwargs):
            return vowel_fraction(completions)

    phases: dict[str, float] = defaultdict(float)
    module_cls = profiled_grpo(GRPO, phases) if settings.profile else GRPO
    work = WorkCounter()
    # only the packed run passes the options, so that a baseline revision without them runs too
    packing = dict(packing=True, max_tokens_per_micro_batch=settings.max_tokens_per_micro_batch) if packed else {}
    module = module_cls(
        policy=Policy(settings.model_dir, dtype=settings.dtype),
        rewards=[VowelReward()],
        sampling=Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=settings.max_new_tokens),
        group_size=settings.group_size,
        micro_batch_size=settings.micro_batch_size,
        advantage="mean",
        eps_low=settings.epsilon,
        eps_high=settings.epsilon,
        loss_aggregation="token-mean",
        kl_coef=0.0,
        max_grad_norm=settings.max_grad_norm,
        optimizer=lambda params: torch.optim.AdamW(
            params, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        ),
        seed=settings.seed,
        **packing,
    )
    data = data_module(settings)
    ends: list[float] = []

    class StepClock(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            work.attach(pl_module.model)
            engine = pl_module.rollout_engine
            engine.generate = work.rollout(engine.generate)
            ends.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if settings.device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer = pl.Trainer(
        accelerator="gpu" if settings.device == "cuda" else "cpu",
        devices=1,
        max_steps=settings.total_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepClock()],
    )
    trainer.fit(module, datamodule=data)
    steps = settings.total_steps
    return {
        "step_s": step_times(ends, settings.warmup),
        "phases_s": {k: v / steps for k, v in phases.items()},
        "work": work.per_step(steps),
    }


def profiled_grpo(base: type, phases: dict[str, float]) -> type:
    """``base`` with the wall time of each phase of its step added to ``phases`` (seconds, summed)."""
    import torch

    from vlrl.methods import base as method_base

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                phases[name] += time.perf_counter() - start

        return wrapper

    method_base.encode_prompt = timed("encode_prompts", method_base.encode_prompt)

    class Profiled(base):
        def configure_model(self) -> None:
            super().configure_model()
            engine = self.rollout_engine
            engine.generate = timed("engine_generate", engine.generate)
            tok = self.tokenizer
            tok.batch_decode = timed("decode", tok.batch_decode)

        def score(self, rollout):
            return timed("rewards", super().score)(rollout)

        def policy_logprobs(self, *args, **kwargs):
            return timed("logprob_forward", super().policy_logprobs)(*args, **kwargs)

        def manual_backward(self, *args, **kwargs):
            return timed("backward", super().manual_backward)(*args, **kwargs)

        def step_optimizer(self, *args, **kwargs):
            return timed("optimizer", super().step_optimizer)(*args, **kwargs)

    return Profiled


# -------------------------------------------------------------------------------------------- TRL
def run_trl(settings: Settings) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlrl.rollout.hf import VISION_TOKEN_ATTRS

    rows = prompt_rows(settings)
    dataset = Dataset.from_list([{"prompt": r.messages, "images": r.images} for r in rows])
    processor = AutoProcessor.from_pretrained(settings.model_dir)
    processor.tokenizer.padding_side = "left"  # TRL pads prompts on the left and needs the processor's extras alike
    model_config = json.loads((Path(settings.model_dir) / "config.json").read_text())
    suppress = sorted({model_config[a] for a in VISION_TOKEN_ATTRS if isinstance(model_config.get(a), int)})
    accumulation = settings.prompts_per_step * settings.group_size // settings.micro_batch_size

    def vowel_reward(completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return vowel_fraction(texts)

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-speed-"),
        use_cpu=settings.device == "cpu",
        bf16=settings.dtype == "bfloat16",
        model_init_kwargs={"dtype": getattr(torch, settings.dtype), "attn_implementation": "sdpa"},
        max_steps=settings.total_steps,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_generations=settings.group_size,
        num_iterations=1,
        max_completion_length=settings.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"suppress_tokens": suppress},
        beta=0.0,
        epsilon=settings.epsilon,
        loss_type="dapo",
        scale_rewards="none",
        mask_truncated_completions=False,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=settings.max_grad_norm,
        shuffle_dataset=False,
        seed=settings.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    ends: list[float] = []
    work = WorkCounter()

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            work.attach(model)
            model.generate = work.rollout(model.generate)
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if settings.device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=settings.model_dir,
        reward_funcs=[vowel_reward],
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[StepClock()],
    )
    trainer.train()
    return {"step_s": step_times(ends, settings.warmup), "phases_s": {}, "work": work.per_step(settings.total_steps)}


# ------------------------------------------------------------------------------------------ driver
def worker(which: str, settings: Settings) -> None:
    """Run one trainer in this process and print its result as one marked JSON line."""
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    load_before = os.getloadavg()
    # the baseline is vlrl from another path
    result = run_trl(settings) if which == "trl" else run_vlrl(settings, packed=which == "packed")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if settings.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["loadavg"] = [load_before[0], os.getloadavg()[0]]
    print(MARKER + json.dumps(result), flush=True)


def spawn(which: str, settings: Settings, baseline_src: Path | None = None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads)}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if which == "baseline":  # vlrl as it was: its src first on the path, ahead of the installed vlrl
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(baseline_src), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, __file__, "--worker", which, "--settings", json.dumps(asdict(settings))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {which} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARKER) :])


def export_src(ref: str, out_dir: Path) -> Path:
    """The ``src`` folder of the repository at git revision ``ref``, written under ``out_dir``."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "src"], capture_output=True, check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(out_dir)], input=archive.stdout, check=True)
    return out_dir / "src"


def build_model(hidden: int, layers: int, vocab: Path | None, out_dir: Path) -> str:
    from vlrl.models.tiny import build_qwen2_5_vl

    return str(build_qwen2_5_vl(out_dir, hidden=hidden, layers=layers, real_vocab_dir=vocab))


def summarise(runs: dict[str, list[dict[str, Any]]], settings: Settings, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": asdict(settings), "rounds": rounds, "trainers": {}}
    for name, results in runs.items():
        times = [t for r in results for t in r["step_s"]]
        phases: dict[str, list[float]] = defaultdict(list)
        for r in results:
            for k, v in r["phases_s"].items():
                phases[k].append(v)
        out["trainers"][name] = {
            "steps_measured": len(times),
            "median_s_per_step": statistics.median(times),
            "step_s": times,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "peak_cuda_mib": max((r.get("peak_cuda_mib", 0.0) for r in results), default=0.0),
            "loadavg": [r["loadavg"] for r in results],
            "phases_s_per_step": {k: statistics.mean(v) for k, v in phases.items()},
            "work_per_step": {k: statistics.mean(r["work"][k] for r in results) for k in results[0]["work"]},
        }
    trainers = out["trainers"]
    if "vlrl" in trainers and "trl" in trainers:
        out["trl_over_vlrl"] = trainers["trl"]["median_s_per_step"] / trainers["vlrl"]["median_s_per_step"]
    if "packed" in trainers and "trl" in trainers:
        out["trl_over_packed"] = trainers["trl"]["median_s_per_step"] / trainers["packed"]["median_s_per_step"]
    if "baseline" in trainers and "trl" in trainers:
        out["trl_over_baseline"] = trainers["trl"]["median_s_per_step"] / trainers["baseline"]["median_s_per_step"]
    return out


def print_grid(summaries: list[dict[str, Any]], baseline: str | None) -> None:
    """One table over the grid: per vocabulary, G and trainer, the time and the work of a step."""
    names = {"vlrl": "vlrl", "packed": "vlrl packed", "baseline": f"vlrl@{baseline}", "trl": "TRL"}
    head = f"{'vocab':<6} {'G':>2} {'trainer':<16} {'s/step':>7} {'TRL/it':>7} {'vision calls':>12} "
    print("\n" + head + f"{'images':>7} {'prefill tok':>11} {'train tok':>9} {'padded':>7}")
    for summary in summaries:
        trl = summary["trainers"].get("trl", {}).get("median_s_per_step")
        for key, t in summary["trainers"].items():
            w = t["work_per_step"]
            ratio = f"{trl / t['median_s_per_step']:.2f}x" if trl else "-"
            print(
                f"{summary['vocab']:<6} {summary['settings']['group_size']:>2} {names[key]:<16} "
                f"{t['median_s_per_step']:>7.3f} {ratio:>7} {w['vision_calls']:>12.1f} {w['images_encoded']:>7.1f} "
                f"{w['prefill_tokens']:>11.0f} {w.get('train_tokens', float('nan')):>9.0f} {w['padded_frac']:>7.3f}"
            )
    print(
        "(per step; TRL/it: TRL's s/step over the trainer's; train tok: positions through the language model in the "
        "training forwards; padded: their padded fraction)"
    )


def print_report(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    print("settings (both trainers):")
    for key in ("device", "dtype", "threads", "prompts_per_step", "group_size", "micro_batch_size", "max_new_tokens"):
        print(f"  {key:<18} {s[key]}")
    print(
        "  algorithm          advantages r - mean(group) (vlrl advantage=mean | TRL scale_rewards=none); "
        f"clip eps {s['epsilon']}; token-mean loss (vlrl token-mean | TRL dapo); beta 0; 1 iteration; "
        f"1 optimizer step per rollout; AdamW lr {s['learning_rate']} constant, wd 0; grad clip {s['max_grad_norm']}; "
        "temperature 1, top_p 1, top_k off; HF generate"
    )
    print(f"  model              {s['model_dir']}")
    print(f"\n{'trainer':<8} {'steps':>6} {'median s/step':>14} {'peak RSS MiB':>13} {'load avg (start, end)':>24}")
    for name, t in summary["trainers"].items():
        loads = " ".join(f"({a:.2f},{b:.2f})" for a, b in t["loadavg"])
        print(
            f"{name:<8} {t['steps_measured']:>6} {t['median_s_per_step']:>14.3f} {t['peak_rss_mib']:>13.0f}   {loads}"
        )
    if "trl_over_vlrl" in summary:
        print(f"\nTRL s/step / vlrl s/step = {summary['trl_over_vlrl']:.2f}x")
    phases = summary["trainers"].get("vlrl", {}).get("phases_s_per_step")
    if phases:
        print("\nvlrl time per step by phase (s):")
        for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<16} {v:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating vlrl/TRL runs of each")
    parser.add_argument("--only", choices=["vlrl", "trl"], help="run one trainer only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of both trainers (1: steadiest on a shared machine)"
    )
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (B)")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per forward/backward pass")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112, help="side of the synthetic images in pixels")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny language model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the tiny language model")
    parser.add_argument(
        "--vocab",
        type=Path,
        default=REAL_VOCAB_DIR if REAL_VOCAB_DIR.is_dir() else None,
        help="folder with the real Qwen2.5 vocab.json/merges.txt (151k tokens, as real VLMs have); default: "
        "shared/data/tokenizers/qwen2.5 beside the repository when present",
    )
    parser.add_argument("--tiny-vocab", action="store_true", help="use the 1k-token tiny vocabulary instead")
    parser.add_argument(
        "--group-sizes", type=int, nargs="+", help="a grid over G (overrides --group-size); one table for all"
    )
    parser.add_argument(
        "--vocabs", choices=["tiny", "real"], nargs="+", help="a grid over the vocabulary (overrides --tiny-vocab)"
    )
    parser.add_argument(
        "--baseline", metavar="REF", help="also run vlrl as it was at git revision REF (e.g. a commit before a change)"
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="also run vlrl with packed (padding-free) training forwards: the padded fraction before and after",
    )
    parser.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        help="token budget of the packed run's forwards (default: --micro-batch-size samples per forward)",
    )
    parser.add_argument("--profile", action="store_true", help="also time vlrl's step phases")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    parser.add_argument("--worker", choices=["vlrl", "packed", "baseline", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Settings(**json.loads(args.settings)))
        return
    group_sizes = args.group_sizes or [args.group_size]
    for g in group_sizes:
        if (args.prompts * g) % args.micro_batch_size:
            parser.error(f"--micro-batch-size {args.micro_batch_size} must divide prompts x group size {g}")
    vocabs = args.vocabs or ["tiny" if args.tiny_vocab or args.vocab is None else "real"]
    if "real" in vocabs and args.vocab is None:
        parser.error("--vocabs real needs --vocab (the folder with the real Qwen2.5 vocab.json and merges.txt)")
    vlrl_runs = ["vlrl", *(["packed"] if args.packed else [])]
    if args.only:
        order = vlrl_runs if args.only == "vlrl" else [args.only]
    else:
        order = [*vlrl_runs, *(["baseline"] if args.baseline else []), "trl"]
    summaries = []
    with tempfile.TemporaryDirectory(prefix="vlrl-speed-") as tmp:
        baseline_src = export_src(args.baseline, Path(tmp) / "baseline") if args.baseline else None
        for vocab_kind in vocabs:
            vocab = args.vocab if vocab_kind == "real" else None
            model_dir = build_model(args.hidden, args.layers, vocab, Path(tmp) / f"model-{vocab_kind}")
            for g in group_sizes:
                settings = Settings(
                    model_dir=model_dir,
                    device=args.device,
                    dtype=args.dtype,
                    threads=args.threads,
                    prompts_per_step=args.prompts,
                    group_size=g,
                    micro_batch_size=args.micro_batch_size,
                    max_new_tokens=args.max_new_tokens,
                    image_size=args.image_size,
                    steps=args.steps,
                    warmup=args.warmup,
                    profile=args.profile,
                    max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                )
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
                start = time.perf_counter()
                for _ in range(args.rounds):
                    for name in order:
                        runs[name].append(spawn(name, settings, baseline_src))
                summary = summarise(runs, settings, args.rounds)
                summary["wall_s"] = time.perf_counter() - start
                summary["vocab"] = vocab_kind
                summary["baseline"] = args.baseline
                vocab_name = "real Qwen2.5 vocabulary (151,665 tokens)" if vocab else "tiny vocabulary (1,032 tokens)"
                summary["settings"]["model_dir"] = (
                    f"tiny Qwen2.5-VL, hidden {args.hidden}, {args.layers} layers, {vocab_name}"
                )
                print_report(summary)
                summaries.append(summary)
    print_grid(summaries, args.baseline)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = summaries[0] if len(summaries) == 1 else {"grid": summaries}
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
