"""``vlrl-check-gpu``: a few GRPO steps end to end on this machine, with throughput and peak memory.

Builds offline a small model with the real Qwen2.5-VL architecture (random weights; hidden size 512 and
4 layers by default, vision tower included), takes the embedded synthetic task, and runs GRPO steps on
one device: rollouts with vLLM when it is importable on a CUDA machine, otherwise HF ``generate`` (the
output says which, and why). It prints per step and as medians over the steps after the first (warm-up):

- rollout tokens/s: response tokens sampled per second of rollout;
- training tokens/s: prompt + response tokens of the update batch per second of the update (the
  forward/backward passes and optimizer steps);
- step time and peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS);
- with vLLM, the engine/trainer log-prob mismatch (``importance_correction: measure``).

Run on a GPU machine after installing (``pip install -e .[qlora]``, plus vLLM for the vLLM path)::

    vlrl-check-gpu                                   # CUDA, bf16, vLLM if importable
    vlrl-check-gpu --engine hf --hidden 1024 --steps 5
    vlrl-check-gpu --device cpu --hidden 64 --steps 1 --max-new-tokens 8   # a CPU smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch

from vlrl.data import RLDataModule, Synthetic
from vlrl.hooks import RLCallback
from vlrl.methods import GRPO
from vlrl.models import Policy
from vlrl.models.tiny import build_qwen2_5_vl
from vlrl.rewards import AccuracyReward, BoxedFormatReward
from vlrl.rollout import HFEngine, RolloutEngine, Sampling


@dataclass
class StepFigures:
    """What one GRPO step measured."""

    rollout_tokens_per_s: float
    train_tokens_per_s: float
    step_s: float


@dataclass
class Report:
    """What ``check`` measured: the engine used, per-step figures and peak memory in GiB."""

    engine: str
    device: str
    steps: list[StepFigures] = field(default_factory=list)
    peak_memory_gib: float = 0.0
    mismatch: float | None = None  # mean |log π_trainer − log π_engine| (vLLM only)

    def median(self, name: str) -> float:
        """Median of a figure over the steps after the first (all steps if there is only one)."""
        values = [getattr(s, name) for s in (self.steps[1:] or self.steps)]
        return statistics.median(values)


class Timer(RLCallback):
    """Times each step's rollout and update and counts their tokens."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.start = time.perf_counter()

    def on_advantages_computed(self, trainer, pl_module, rollout):
        self._sync(pl_module)
        self.update_start = time.perf_counter()
        prompt_tokens = sum(p.length for p in rollout.prompts)
        self.train_tokens = (prompt_tokens + float(rollout.response_mask.sum())) * pl_module.epochs
        return rollout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        end = time.perf_counter()
        metrics = trainer.callback_metrics
        self.report.steps.append(
            StepFigures(
                rollout_tokens_per_s=float(metrics["perf/rollout_tokens_per_s"]),
                train_tokens_per_s=self.train_tokens / max(end - self.update_start, 1e-9),
                step_s=end - self.start,
            )
        )
        if "rollout/engine_mismatch_mean_abs_log_ratio" in metrics:
            self.report.mismatch = float(metrics["rollout/engine_mismatch_mean_abs_log_ratio"])

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def choose_engine(requested: str, device: str) -> tuple[RolloutEngine, str]:
    """The rollout engine and a sentence saying which one runs and why."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not has_vllm:
        raise SystemExit("--engine vllm: vllm is not importable here; install it or use --engine hf")
    if requested == "vllm" or (requested == "auto" and has_vllm and device == "cuda"):
        from vlrl.rollout.vllm import VLLMEngine

        dtype = "bfloat16" if device == "cuda" else None  # bf16 copies of the float32 master weights
        return VLLMEngine(gpu_memory_utilization=0.3, sleep_level=1 if device == "cuda" else 0, dtype=dtype), "vLLM"
    if requested == "hf":
        return HFEngine(), "HF generate (--engine hf)"
    reason = "vllm is not importable" if not has_vllm else "vLLM rollouts are checked on CUDA only"
    return HFEngine(), f"HF generate ({reason})"


def check(args: argparse.Namespace) -> Report:
    """Build the model, run ``args.steps`` GRPO steps and return what was measured."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (check nvidia-smi / CUDA_VISIBLE_DEVICES)")
    engine, engine_name = choose_engine(args.engine, args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlrl-check-"))
    path = build_qwen2_5_vl(
        work / "model", hidden=args.hidden, layers=args.layers, vision_hidden=64, min_pixels=56 * 56
    )
    dtype = "float32"  # master weights; on CUDA the compute is bf16 (bf16-mixed), as in the shipped configs
    module = GRPO(
        policy=Policy(str(path), dtype=dtype),
        rewards=[AccuracyReward(), BoxedFormatReward(weight=0.1)],
        rollout_engine=engine,
        sampling=Sampling(temperature=1.0, max_new_tokens=args.max_new_tokens),
        group_size=args.group_size,
        micro_batch_size=args.group_size,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
        importance_correction="measure" if engine_name == "vLLM" else "none",
    )
    data = RLDataModule(
        train=Synthetic("train", size=args.batch_size * args.steps),
        batch_size=args.batch_size,
        prompt_template="{question}\nPut your final answer within \\boxed{{}}.",
    )
    report = Report(engine=engine_name, device=args.device)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.device == "cuda" else "32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer(report)],
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, datamodule=data)
    finally:
        if engine_name == "vLLM":
            engine.close()  # frees its GPU memory and worker state
    if args.device == "cuda":
        report.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is in KiB on Linux
        report.peak_memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def print_report(report: Report, args: argparse.Namespace) -> None:
    name = "GPU" if report.device == "cuda" else "CPU"
    where = torch.cuda.get_device_name() if report.device == "cuda" else "cpu"
    print(f"device: {where}; rollout engine: {report.engine}")
    print(
        f"model: Qwen2.5-VL architecture, hidden {args.hidden}, {args.layers} layers (random weights); "
        f"{args.batch_size} prompts x {args.group_size} samples, up to {args.max_new_tokens} new tokens"
    )
    print(f"{'step':>4} {'rollout tok/s':>14} {'train tok/s':>12} {'step s':>8}")
    for i, s in enumerate(report.steps):
        print(f"{i:>4} {s.rollout_tokens_per_s:>14.1f} {s.train_tokens_per_s:>12.1f} {s.step_s:>8.2f}")
    label = "median after warm-up" if len(report.steps) > 1 else "single step"
    print(
        f"{label}: rollout {report.median('rollout_tokens_per_s'):.1f} tok/s, "
        f"training {report.median('train_tokens_per_s'):.1f} tok/s, step {report.median('step_s'):.2f} s"
    )
    print(f"peak {name} memory: {report.peak_memory_gib:.2f} GiB")
    if report.mismatch is not None:
        print(f"engine/trainer mean |log-prob difference|: {report.mismatch:.2e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlrl-check-gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto", help="rollout engine")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps (the first is warm-up)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--workdir", help="where the model is written (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.hidden < 64 or args.hidden % 64:
        parser.error(f"--hidden {args.hidden}: must be a multiple of 64 (heads of 32, grouped key/values)")
    if min(args.steps, args.layers, args.batch_size, args.max_new_tokens) < 1 or args.group_size < 2:
        parser.error("--steps, --layers, --batch-size and --max-new-tokens must be >= 1, --group-size >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = check(args)
    print_report(report, args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
