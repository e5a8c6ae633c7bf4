"""Do the methods learn? Held-out accuracy before and after RL on the embedded synthetic task, on CPU.

Each method starts from a fixed starting point (a short supervised warm start, trained once with
seed 0 and cached under ``outputs/benchmarks/learning/``) and trains for 48 steps (RACRO: 144) on the
colour and shape questions. Held-out accuracy is measured on 512 rows of the ``test`` split: sampled
at the training temperature (T = 1, one answer per row) at the start and every 16 steps (the curve,
overall and on the colour questions alone), and greedy at the start and the end. Per run it prints a
table row (method, seed, held-out rows, start and end accuracy overall and on colour, greedy start
and end, steps, wall time), appends the run with its curves (reward per step, held-out accuracy
overall and per kind) and the commit it ran from to ``benchmarks/results/learning.jsonl`` and saves
``docs/learning_<method>.png`` with the latest run of every seed.

Starting points:

- ``grpo``, ``vl_rethinker``: the tiny Qwen2.5-VL after 60 SFT steps on (image, question) ->
  ``\\boxed{answer}``: colours mostly right when greedy, shapes at chance.
- ``ovr``: Open Vision Reasoner's chain: a 100-step language-only cold start (scenes described in
  words -> step-by-step reasoning, vision frozen), then PPO with a critic on the images.
- ``racro``: a tiny text-only Qwen2 reasoner taught (100 SFT steps) to answer from correct
  descriptions (it is right on all of them), and a weak captioner (150 SFT steps on RACRO's caption
  prompt -> the scene in words: the right colour when greedy, often a broken caption when sampled,
  shapes at chance); RACRO trains the captioner, and the held-out figure is the reasoner's accuracy
  from its captions.
- ``sophia``: the tiny VLM after 80 SFT steps on half answers, half descriptions; SOPHIA's policy
  describes, the reasoner above answers, and the policy learns the kept trajectories; the held-out
  figure is the policy's own accuracy.
- ``unified_reward_think``: a judge after 150 SFT steps on templated judgements of generation pairs
  (a caption such as "a red square" and two drawings that differ in colour or in shape): it names
  both drawings' colours right but its verdict is at chance; GRPO rewards right verdicts (+ format),
  and the held-out figure is its pairwise accuracy, per kind of difference.

Run from the repository root (a method is a function registered with ``@method``, so adding one is
adding a function; ``nice`` leaves the CPU to other work first)::

    nice -n 15 python benchmarks/learning.py --method grpo --seed 0
    nice -n 15 python benchmarks/learning.py --method all --seed 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from vlrl.callbacks import DynamicSampling, ForcedRethinking, SelectiveSampleReplay
from vlrl.data import PreferencePairs, RLDataModule, SFTDataModule, Synthetic, SyntheticPairs
from vlrl.data.prompts import build_messages
from vlrl.data.synthetic import make_rows
from vlrl.evaluation import Evaluation
from vlrl.methods import GRPO, PPO, RACRO, SFT, SOPHIA, UnifiedRewardThink
from vlrl.methods.racro import CAPTION_PROMPT, CAPTION_SYSTEM_PROMPT
from vlrl.models import Policy
from vlrl.rewards import AccuracyReward, CaptionReward, HFReasoner, InvalidResponsePenalty, PreferenceReward
from vlrl.rollout import Sampling

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "outputs" / "benchmarks" / "learning"
RESULTS = ROOT / "benchmarks" / "results" / "learning.jsonl"
DOCS = ROOT / "docs"

KINDS = ["color", "shape"]  # the kinds a tiny VLM learns in a few hundred steps (DESIGN.md, learnability probe)
PROMPT = "{question}\nPut your final answer within \\boxed{{}}."
HELD_OUT = 512  # rows of the held-out test split
EVAL = Sampling(temperature=1.0, max_new_tokens=10)  # held-out answers are sampled as in training
WARM_SEED = 0  # every starting point is trained once, with this seed


# ------------------------------------------------------------------------------------ data


DESCRIBE = "Describe the image."  # the description prompt of the SOPHIA policy (no question shown)
REASONER_PROMPT = "### Description: {caption}\n### Question: {question}\nPut your final answer within \\boxed{{}}."


class TaskRows(Synthetic):
    """Synthetic rows of the color and shape questions, each with the target an SFT warm start learns.

    Args:
        split: Which split to draw.
        size: Number of rows.
        target: ``answer``: (image, question) -> ``\\boxed{answer}``; ``reasoning``: the scene in
            words, no image -> step-by-step reasoning (the task's own text-only rows); ``caption``:
            (image, RACRO's caption prompt) -> the scene in words; ``reasoner``: the reasoner
            prompt with the scene in words, no image -> ``\\boxed{answer}``; ``answer+describe``:
            even rows ``answer``, odd rows (image, ``DESCRIBE``) -> the scene in words.
    """

    def __init__(self, split: str, size: int, target: str) -> None:
        super().__init__(split, size, kinds=KINDS, text_only=target == "reasoning")
        self.target = target

    def records(self) -> Iterator[Any]:
        described = describe_rows(self.split, self.size, self.kinds)
        for i, record in enumerate(super().records()):
            row, (description, question) = record.value, described[i]
            boxed = f"\\boxed{{{row['answer']}}}"
            if self.target == "answer" or (self.target == "answer+describe" and i % 2 == 0):
                row["response"] = boxed
            elif self.target == "answer+describe":
                user = [{"type": "image"}, {"type": "text", "text": DESCRIBE}]
                row["messages"] = [{"role": "user", "content": user}, assistant(description)]
                del row["question"]
            elif self.target == "caption":
                chat = build_messages(question, None, 1, None, CAPTION_PROMPT, CAPTION_SYSTEM_PROMPT)
                row["messages"] = [*chat, assistant(description)]
                del row["question"]
            elif self.target == "reasoner":
                row["question"] = REASONER_PROMPT.format(caption=description, question=question)
                row["response"], row["images"] = boxed, []
            yield record


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def describe_rows(split: str, size: int, kinds: list[str]) -> list[tuple[str, str]]:
    """(description in words, bare question) of each row of a split, in the order of ``make_rows``."""
    plain = make_rows(split, size, 0, kinds)
    text = make_rows(split, size, 0, kinds, text_only=True)
    out = []
    for p, t in zip(plain, text, strict=True):
        description = t["question"][: -len(p["question"])].strip()  # text rows are "<description> <question>"
        out.append((description, p["question"]))
    return out


def rl_data(seed: int, batch_size: int) -> RLDataModule:
    """Training prompts of the train split; the held-out test split as validation."""
    return RLDataModule(
        train=Synthetic("train", size=2048, kinds=KINDS),
        val=Synthetic("test", size=HELD_OUT, kinds=KINDS),
        batch_size=batch_size,
        eval_batch_size=64,
        prompt_template=PROMPT,
        seed=seed,
    )


JUDGE_PROMPT = (
    "Caption: {caption}\nWhich image fits the caption better? Score both images on consistency, aesthetics and "
    'authenticity inside <think></think>, then answer "Image 1 is better" or "Image 2 is better" inside <answer></answer>.'
)


class JudgePairs(PreferencePairs):
    """Generation pairs of the renderer (a caption, two drawings) as judging prompts, whose ``data_source`` is
    what the two drawings differ in (``color`` or ``shape``), so the judge's accuracy is reported per kind."""

    def __init__(self, split: str, size: int) -> None:
        super().__init__(SyntheticPairs(split, size, tasks=["generation"]), generation_prompt=JUDGE_PROMPT)

    def judge_record(self, record: Any, where: Any) -> dict[str, Any]:
        row = super().judge_record(record, where)
        # the templated judgement names both drawings: "Image 1 shows a red square, Image 2 a blue square; ..."
        first, second = row["response"].removeprefix("<think>Image 1 shows ").split(";")[0].split(", Image 2 ")
        row["data_source"] = "shape" if first.split()[1] == second.split()[1] else "color"
        return row


def judge_data(seed: int, batch_size: int) -> RLDataModule:
    """Training pairs of the train split; the held-out test split as validation."""
    return RLDataModule(
        train=JudgePairs("train", 2048),
        val=JudgePairs("test", HELD_OUT),
        batch_size=batch_size,
        eval_batch_size=64,
        seed=seed,
    )


# ------------------------------------------------------------------------------ recording


@dataclass
class Curves:
    """What a run measured: the training reward per step and the held-out accuracy at evaluations."""

    reward_key: str
    steps: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=dict)  # held-out accuracy per question kind


class Recorder(Callback):
    """Reads the logged reward after every step and the held-out accuracy after every evaluation."""

    def __init__(self, reward_key: str) -> None:
        self.curves = Curves(reward_key)
        self.active = True  # off during the greedy evaluations, which are not part of the curve

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get(self.curves.reward_key)
        if value is not None:
            self.curves.steps.append(trainer.global_step)
            self.curves.rewards.append(float(value))

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged the epoch's accuracy
        value = trainer.callback_metrics.get("val/accuracy")
        if value is not None and self.active:
            self.curves.eval_steps.append(trainer.global_step)
            self.curves.accuracy.append(float(value))
            for kind in KINDS:
                kind_value = trainer.callback_metrics.get(f"val/accuracy/{kind}")
                self.curves.by_kind.setdefault(kind, []).append(
                    float("nan") if kind_value is None else float(kind_value)
                )


def trainer(max_steps: int, callbacks: list[Callback], val_every: int | None = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=val_every or max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=None if val_every else 0,
        callbacks=callbacks,
        inference_mode=False,  # no_grad instead: validate() before fit() must leave the accuracy metric trainable
    )


@dataclass
class Result:
    """One run: held-out accuracy sampled at the training temperature (start, end) and greedy (start, end)."""

    method: str
    seed: int
    held_out: int
    start_accuracy: float
    end_accuracy: float
    greedy_start: float
    greedy_end: float
    wall_s: float
    steps: int
    curves: Curves
    commit: str = field(default_factory=lambda: CODE_VERSION)


def code_version() -> str:
    """The commit the run's code came from, with ``+dirty`` when the source tree had changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (
        "+dirty" if git("status", "--porcelain", "--", "src", "callbacks", "benchmarks/learning.py") else ""
    )


CODE_VERSION = code_version()  # read when the script starts, before any run


def run_rl(
    method: str,
    seed: int,
    module: pl.LightningModule,
    data: RLDataModule,
    steps: int,
    every: int,
    key: str,
    callbacks: list[Callback] = (),
) -> Result:
    """``steps`` training steps; held-out accuracy sampled at temperature 1 at the start and every ``every``
    steps (the curve), and greedy at the start and the end."""
    pl.seed_everything(seed, workers=True, verbose=False)
    # the held-out figures are read strictly (as the reward reads answers), as when the table was first measured
    module.evaluation = Evaluation(grading="reward", write_predictions=False, print_summary=False)
    recorder = Recorder(key)
    run = trainer(steps, [*callbacks, recorder], val_every=every)
    start = time.perf_counter()
    greedy_start = greedy_accuracy(run, module, data, recorder)
    run.validate(module, datamodule=data, verbose=False)
    run.fit(module, datamodule=data)
    greedy_end = greedy_accuracy(run, module, data, recorder)
    wall = time.perf_counter() - start
    c = recorder.curves
    return Result(method, seed, HELD_OUT, c.accuracy[0], c.accuracy[-1], greedy_start, greedy_end, wall, steps, c)


def greedy_accuracy(run: pl.Trainer, module: pl.LightningModule, data: RLDataModule, recorder: Recorder) -> float:
    """Held-out accuracy with greedy decoding (the module's evaluation sampling at temperature 0)."""
    temperature, module.eval_sampling.temperature = module.eval_sampling.temperature, 0.0
    recorder.active = False
    try:
        return float(run.validate(module, datamodule=data, verbose=False)[0]["val/accuracy"])
    finally:
        module.eval_sampling.temperature, recorder.active = temperature, True


# ---------------------------------------------------------------------------- warm starts


def warm_start(name: str, policy: Policy, data: SFTDataModule, steps: int, lr: float = 1e-3) -> str:
    """Fine-tune ``policy`` for ``steps`` SFT steps once and save it as a Hugging Face directory (cached)."""
    out = CACHE / f"{name}_{steps}"
    if (out / "config.json").exists():
        return str(out)
    pl.seed_everything(WARM_SEED, workers=True, verbose=False)
    module = SFT(policy, optimizer=adamw(lr), max_length=256, micro_batch_size=64)
    start = time.perf_counter()
    trainer(steps, []).fit(module, datamodule=data)
    module.model.save_pretrained(out)
    module.processor.save_pretrained(out)
    print(f"warm start {name}: {steps} SFT steps in {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return str(out)


def sft_data(target: str, prompt_template: str = PROMPT) -> SFTDataModule:
    return SFTDataModule(train=TaskRows("train", 2048, target), batch_size=32, prompt_template=prompt_template)


def answer_start() -> str:
    """The tiny VLM after a short SFT on (image, question) -> ``\\boxed{answer}``: partly right."""
    return warm_start("answer_sft", Policy("tiny:qwen2_5_vl", dtype="float32"), sft_data("answer"), steps=60)


def describe_and_answer_start() -> str:
    """The tiny VLM after a short SFT on half answers, half descriptions (``DESCRIBE`` -> the scene in words)."""
    policy = Policy("tiny:qwen2_5_vl", dtype="float32")
    return warm_start("describe_answer_sft", policy, sft_data("answer+describe"), steps=80)


def caption_start() -> str:
    """A weak captioner: the tiny VLM after a few SFT steps on RACRO's caption prompt -> the scene in words."""
    return warm_start("caption_sft", Policy("tiny:qwen2_5_vl", dtype="float32"), sft_data("caption"), steps=150)


def reasoner_start() -> str:
    """The tiny text-only Qwen2 taught to answer from correct descriptions (``REASONER_PROMPT``)."""
    return warm_start("reasoner_sft", Policy("tiny:qwen2", dtype="float32"), sft_data("reasoner", "{question}"), 100)


def judge_start() -> str:
    """UnifiedReward-Think's cold start: SFT on templated judgements of generation pairs (format learnt, verdicts
    partly right)."""
    data = SFTDataModule(train=JudgePairs("train", 2048), batch_size=32)
    return warm_start("judge_sft", Policy("tiny:qwen2_5_vl", dtype="float32"), data, steps=JUDGE_SFT_STEPS)


JUDGE_SFT_STEPS = 150


def cold_start() -> str:
    """Open Vision Reasoner's stage 1: language-only SFT on scenes in words with step-by-step reasoning."""
    policy = Policy("tiny:qwen2_5_vl", dtype="float32", freeze_vision=True)
    return warm_start("ovr_cold_start", policy, sft_data("reasoning"), steps=100)


def reasoner_reward(samples: int, temperature: float) -> CaptionReward:
    """The frozen reasoner of RACRO and SOPHIA, answering from a description."""
    return CaptionReward(
        HFReasoner(reasoner_start(), dtype="float32"),
        samples_per_caption=samples,
        sampling=Sampling(temperature=temperature, max_new_tokens=12),
        eval_sampling=Sampling(temperature=0.0, max_new_tokens=12),
        system_prompt=None,
        prompt=REASONER_PROMPT,
    )


# ------------------------------------------------------------------------------------ methods

METHODS: dict[str, Callable[[int], Result]] = {}


def method(name: str) -> Callable:
    """Register a benchmark: a function of the RL seed that returns its ``Result``."""

    def register(fn: Callable[[int], Result]) -> Callable[[int], Result]:
        METHODS[name] = fn
        return fn

    return register


def adamw(lr: float) -> Callable:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def short_answers(max_new_tokens: int = 10, **kwargs) -> dict[str, Any]:
    """G = 8 samples at temperature 1 of up to ``max_new_tokens`` tokens, in training and held-out evaluation
    (``kwargs`` override any of it)."""
    return (
        dict(
            sampling=Sampling(temperature=1.0, max_new_tokens=max_new_tokens),
            eval_sampling=replace(EVAL, max_new_tokens=max_new_tokens),
            group_size=8,
            micro_batch_size=32,
        )
        | kwargs
    )


@method("grpo")
def grpo(seed: int) -> Result:
    module = GRPO(
        policy=Policy(answer_start(), dtype="float32"),
        rewards=[AccuracyReward()],
        advantage="std",
        optimizer=adamw(2e-4),
        seed=seed,
        **short_answers(),
    )
    return run_rl("grpo", seed, module, rl_data(seed, batch_size=8), steps=48, every=16, key="reward/mean")


@method("gspo")
def gspo(seed: int) -> Result:
    """GSPO from GRPO's start and schedule: the length-normalised sequence ratio clipped at 1 − 3e-4 / 1 + 4e-4 (the
    paper's), seq-mean-token-mean, group-std advantages. One optimizer step per rollout, as the grpo row, so the
    ratio is 1 and the clip idle: the difference to grpo is the sequence-level loss and its aggregation."""
    module = GRPO(
        policy=Policy(answer_start(), dtype="float32"),
        rewards=[AccuracyReward()],
        advantage="std",
        policy_term="gspo",
        eps_low=3e-4,
        eps_high=4e-4,
        loss_aggregation="seq-mean-token-mean",
        optimizer=adamw(2e-4),
        seed=seed,
        **short_answers(),
    )
    return run_rl("gspo", seed, module, rl_data(seed, batch_size=8), steps=48, every=16, key="reward/mean")


@method("dapo")
def dapo(seed: int) -> Result:
    """DAPO from GRPO's start and schedule: clip-higher (0.2 / 0.28), token-mean, no KL, dynamic sampling (at most
    3 prompt batches per step), overlong filtering and the soft overlong punishment over the last
    ``DAPO_CACHE`` tokens of the length limit."""
    module = GRPO(
        policy=Policy(answer_start(), dtype="float32"),
        rewards=[AccuracyReward()],
        advantage="std",
        eps_low=0.2,
        eps_high=0.28,
        loss_aggregation="token-mean",
        overlong_filter=True,
        overlong_cache=DAPO_CACHE,
        optimizer=adamw(2e-4),
        seed=seed,
        **short_answers(),
    )
    data = rl_data(seed, batch_size=8)
    callbacks = [DynamicSampling(max_draws=3)]
    return run_rl("dapo", seed, module, data, steps=48, every=16, key="reward/mean", callbacks=callbacks)


DAPO_CACHE = 2  # of the 10 answer tokens: a penalty past 8 tokens (a boxed colour or shape and EOS are 6)


@method("vl_rethinker")
def vl_rethinker(seed: int, mask_trigger: bool = True, name: str = "vl_rethinker") -> Result:
    """GRPO (mean-only advantages, clip 0.2/0.35) with forced rethinking and selective sample replay; the
    inserted trigger ("Wait, ...") is left out of the loss."""
    module = GRPO(
        policy=Policy(answer_start(), dtype="float32"),
        rewards=[AccuracyReward(), InvalidResponsePenalty()],
        advantage="mean",
        eps_low=0.2,
        eps_high=0.35,
        optimizer=adamw(2e-4),
        seed=seed,
        **short_answers(sampling=Sampling(temperature=1.0, top_p=0.95, max_new_tokens=24)),
    )
    callbacks = [
        ForcedRethinking(
            min_room=4,
            min_continuation_tokens=1,
            max_continuation_tokens=12,
            mask_trigger=mask_trigger,
            seed=seed,
        ),
        SelectiveSampleReplay(alpha=1.0),
    ]
    data = rl_data(seed, batch_size=8)
    return run_rl(name, seed, module, data, steps=48, every=16, key="reward/accuracy", callbacks=callbacks)


@method("vl_rethinker_trained_trigger")
def vl_rethinker_trained_trigger(seed: int) -> Result:
    """The paper's setting: the inserted trigger tokens are trained on like the policy's own tokens."""
    return vl_rethinker(seed, mask_trigger=False, name="vl_rethinker_trained_trigger")


@method("ovr")
def ovr(seed: int) -> Result:
    """Open Vision Reasoner: the language-only cold start, then PPO with a critic (GAE, gamma = lambda = 1)."""
    start = cold_start()
    module = PPO(
        policy=Policy(start, dtype="float32"),
        critic=Policy(start, dtype="float32"),
        rewards=[AccuracyReward()],
        critic_steps=4,
        optimizer=adamw(1e-4),  # at 2e-4 one seed's entropy ran away (0.5 -> 6.9 nats) and every answer was truncated
        critic_optimizer=adamw(1e-3),
        seed=seed,
        **short_answers(max_new_tokens=56),
    )
    return run_rl("ovr", seed, module, rl_data(seed, batch_size=4), steps=48, every=16, key="reward/mean")


@method("racro")
def racro(seed: int) -> Result:
    """RACRO: the weak captioner trained by GRPO on the reasoner's accuracy from its captions."""
    module = RACRO(
        policy=Policy(caption_start(), dtype="float32"),
        caption_reward=reasoner_reward(samples=1, temperature=0.0),
        advantage="std",
        kl_coef=0.001,
        optimizer=adamw(2e-4),
        seed=seed,
        **short_answers(max_new_tokens=32),
    )
    # 144 steps, not 48: only the colour word of a caption can earn reward (the captioner does not see shapes), and
    # half the prompts ask for the shape, so the colour signal per step is about half of GRPO's
    return run_rl("racro", seed, module, rl_data(seed, batch_size=8), steps=144, every=16, key="reward/mean")


@method("sophia")
def sophia(seed: int) -> Result:
    """SOPHIA online: descriptions by the policy, trajectories by the reasoner, weighted SFT on the kept ones."""
    module = SOPHIA(
        policy=Policy(describe_and_answer_start(), dtype="float32"),
        visual_reward=reasoner_reward(samples=4, temperature=1.0),
        descriptions_per_image=4,
        description_sampling=Sampling(temperature=1.0, max_new_tokens=32),
        description_prompt=DESCRIBE,
        alpha=0.5,
        keep="one",
        optimizer=adamw(2e-4),
        max_length=256,
        micro_batch_size=32,
        eval_sampling=replace(EVAL),
        seed=seed,
    )
    return run_rl("sophia", seed, module, rl_data(seed, batch_size=8), steps=48, every=16, key="reasoner/accuracy")


@method("unified_reward_think")
def unified_reward_think(seed: int) -> Result:
    """UnifiedReward-Think's GRPO stage: the judge, after its cold start, rewarded for right verdicts (+ format).

    The held-out figure is the judge's pairwise accuracy on generation pairs; the paper's settings (std advantages
    with eps 1e-4, top-p 0.95, k3 KL 0.04 to the cold start) except the learning rate (a tiny model)."""
    module = UnifiedRewardThink(
        policy=Policy(judge_start(), dtype="float32"),
        rewards=[PreferenceReward(format_weight=1.0)],
        advantage="std",
        advantage_eps=1e-4,
        kl_coef=0.04,
        optimizer=adamw(2e-4),
        seed=seed,
        **short_answers(
            sampling=Sampling(temperature=1.0, top_p=0.95, max_new_tokens=JUDGE_TOKENS),
            eval_sampling=Sampling(temperature=1.0, top_p=0.95, max_new_tokens=JUDGE_TOKENS),  # as in training
        ),
    )
    data = judge_data(seed, batch_size=8)
    return run_rl("unified_reward_think", seed, module, data, steps=48, every=16, key="reward/mean")


JUDGE_TOKENS = 128  # a templated judgement is about 115 tokens of the tiny tokenizer


# ------------------------------------------------------------------------------------ output


def save(result: Result) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(json.dumps(asdict(result)) + "\n")


def latest(method_name: str) -> dict[int, dict]:
    """The latest recorded run of ``method_name`` for each seed."""
    runs: dict[int, dict] = {}
    if RESULTS.exists():
        for line in RESULTS.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["method"] == method_name:
                runs[row["seed"]] = row
    return runs


def plot(method_name: str) -> Path:
    """``docs/learning_<method>.png``: reward and held-out accuracy against the step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = latest(method_name)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (seed, run) in enumerate(sorted(runs.items())):
        c, colour = run["curves"], f"C{i}"
        left.plot(c["steps"], c["rewards"], color=colour, alpha=0.25)
        left.plot(c["steps"], moving_average(c["rewards"], 8), color=colour, label=f"seed {seed} (mean of 8 steps)")
        right.plot(c["eval_steps"], c["accuracy"], marker="o", color=colour, label=f"seed {seed}, sampled (T=1)")
        if "color" in c["by_kind"]:
            right.plot(
                c["eval_steps"], c["by_kind"]["color"], linestyle=":", color=colour, label=f"seed {seed}, colour only"
            )
        greedy = [run["greedy_start"], run["greedy_end"]]
        ends = [c["eval_steps"][0], c["eval_steps"][-1]]
        right.plot(ends, greedy, marker="s", linestyle="--", color=colour, alpha=0.6, label=f"seed {seed}, greedy")
    left.set(xlabel="step", ylabel=next(iter(runs.values()))["curves"]["reward_key"], title="training reward")
    right.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title=f"held-out accuracy (n = {HELD_OUT})")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{method_name}: tiny models, synthetic task, CPU")
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    path = DOCS / f"learning_{method_name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def row(result: Result) -> str:
    colour = result.curves.by_kind.get("color") or [float("nan")]
    return (
        f"| {result.method:<12} | {result.seed:>4} | {result.held_out:>8} | {result.start_accuracy:>9.3f} "
        f"| {result.end_accuracy:>7.3f} | {colour[0]:>11.3f} | {colour[-1]:>9.3f} | {result.greedy_start:>12.3f} "
        f"| {result.greedy_end:>10.3f} | {result.steps:>5} | {result.wall_s:>6.0f} |"
    )


HEADER = (
    "| method       | seed | held-out | start acc | end acc | colour start | colour end | greedy start | greedy end "
    "| steps | wall s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def report() -> str:
    """The README's table: the latest recorded run of each method and seed, start -> end per seed."""
    lines = [
        "| method | seeds | held-out n | steps | sampled (T=1) | colour only, sampled | greedy | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pairs(runs: list[dict], start: Callable[[dict], float], end: Callable[[dict], float]) -> str:
        return " / ".join(f"{start(r):.3f} → {end(r):.3f}" for r in runs)

    def colour(run: dict, i: int) -> float:
        return run["curves"]["by_kind"].get("color", [float("nan")])[i]

    for name in METHODS:
        runs = [run for _, run in sorted(latest(name).items())]
        if not runs:
            continue
        lines.append(
            f"| {name} | {' / '.join(str(r['seed']) for r in runs)} | {runs[0]['held_out']} | {runs[0]['steps']} "
            f"| {pairs(runs, lambda r: r['start_accuracy'], lambda r: r['end_accuracy'])} "
            f"| {pairs(runs, lambda r: colour(r, 0), lambda r: colour(r, -1))} "
            f"| {pairs(runs, lambda r: r['greedy_start'], lambda r: r['greedy_end'])} "
            f"| {', '.join(sorted({r.get('commit', '?') for r in runs}))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="grpo", choices=[*METHODS, "all"])
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1], dest="seeds", help="RL seeds (default 0 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--report", action="store_true", help="print the table of the latest recorded runs and redraw the figures"
    )
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        for name in METHODS:
            if latest(name):
                print(f"figure: {plot(name).relative_to(ROOT)}")
        return
    torch.set_num_threads(args.threads)
    names = list(METHODS) if args.method == "all" else [args.method]
    print(HEADER)
    for name in names:
        for seed in args.seeds:
            result = METHODS[name](seed)
            save(result)
            print(row(result), flush=True)
        print(f"figure: {plot(name).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
