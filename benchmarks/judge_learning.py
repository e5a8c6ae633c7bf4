"""Does UnifiedReward-Think's judge learn? Its three stages on CPU, judged in both orders, on a task a tiny judge can reach.

The judge of ``benchmarks/learning.py`` (generation pairs: a caption and two drawings) stays at chance:
the tiny model names both drawings right but cannot compare them with the caption in a 115-token
judgement. This benchmark gives it a pairwise task whose verdict follows step by step from what is
drawn: understanding pairs of the colour question ("What colour is the shape?", one answer right, one
wrong), with a short templated judgement (41 tokens of the tiny tokenizer) that copies both answers, names
the colour seen, and names the answer that has it::

    <think>Answer 1 blue. Answer 2 red. The shape is red.</think>
    <answer>Answer 2 is better</answer>

What the first version of this benchmark got wrong (measured): its judgement ("The shape is red. Answer 1
says blue: wrong. Answer 2 says red: right.") is 52 tokens, so with 48 new tokens every judgement was cut
before ``</answer>`` (format rate 0, nothing for rejection sampling to keep); and with the checks after the
colour, 300 SFT steps (2048 pairs, lr 1e-3, batch 32) named the colour right (100%) and copied Answer 1
right (100%) but wrote the seen colour as Answer 2 and "Answer 1 ...: no" every time (both-orders accuracy
0, position consistency 0): it never learnt to compare. With the answers copied first and the verdict a
look-up of the seen colour among them, the same SFT reaches 18% both orders at 150 steps and 100% at 300 (two rounds of 150).

Each candidate is written plainly ("red") or boxed ("\\boxed{red}") at random, so the judge also reads a
policy's boxed answers (``--stage reward`` below). Per seed, the paper's chain:

1. cold start: SFT on ``COLD_PAIRS`` templated judgements (``COLD_STEPS`` steps, lr 1e-3, batch 32: the
   settings of DESIGN.md's learnability probe), stopped short of the 300 steps that reach 100%, so the later
   stages have something to add;
2. rejection sampling: the cold-start judge samples one judgement (T = 1) for each of
   ``RS_PAIRS`` other training pairs (``UnifiedRewardThink.predict``); the right ones are SFT data
   for ``RS_STEPS`` more steps with the stage-1 settings, the wrong ones go to stage 3;
3. GRPO on the wrongly judged pairs (accuracy + format reward, G = 8, k3 KL 0.04 to the stage-2 judge).

After each stage the judge is evaluated greedily on ``HELD_OUT`` pairs of the ``test`` split in both
orders (``UnifiedRewardThink(order_swap=True)``): accuracy counts a pair only when both verdicts are
right; also the one-order accuracy, the position consistency and the format rate. Each run appends a
line to ``benchmarks/results/judge_learning.jsonl`` and redraws ``docs/learning_judge.png``.

``--stage reward``: the trained judge (stage 3 of ``--judge-seed``) as ``JudgeReward`` in a GRPO run of
the tiny policy of ``benchmarks/learning.py`` (after its 60-step warm start) on the colour question, paid
only by the judge (no gold-answer reward), ``REWARD_STEPS`` steps; ``--mode``:

- ``pairwise``: the response against the gold answer, the response as Answer 1. A right response makes a pair
  of two equal answers, which the judge never saw in training (ties are not a label), so its verdict on it
  is a matter of position;
- ``pairwise_swap``: the same in both positions, paid only when preferred in both: for two equal answers
  that asks a position-consistent judge for opposite verdicts on the same content;
- ``pointwise``: ``POINT_PROMPT`` (one answer, "1" right / "0" wrong), with the stage-3 judge taught that
  prompt by ``POINT_STEPS`` more SFT steps on ``ColourAnswers`` (clean answers only);
- ``pointwise_malformed``: the same, taught on ``ColourAnswers(malformed=True)``: half of its candidates
  broken the ways the policy broke them under the ``pointwise`` judge (a repeated colour, an unclosed box,
  junk, two colours), all scored 0;
- ``gold``: the control, paid by the gold answer (``AccuracyReward``).

Before training, each judge's mean pay of right, wrong and malformed answers on 256 held-out questions is
recorded (``judge_check``); the policy's held-out accuracy (exact match with the gold answer, sampled at
T = 1) against the step goes to ``docs/judge_reward_grpo.png``.

Measured (``--report``; two seeds, about 5 minutes a chain): both-orders accuracy 0.93 / 0.72 after the cold
start, 1.00 / 0.98 after rejection sampling (437 / 362 of 512 pairs kept), 1.00 / 0.99 after GRPO. GRPO adds
nothing measurable: its pairs are the ones the cold-start judge got wrong, but the stage-2 judge already
judges them right, so almost every group's rewards are all 2.0 (zero advantages). As rewards (policy seeds
0 / 1, 32 steps, held-out accuracy from 0.37 / 0.43): gold 0.75 / 0.77; ``pointwise_malformed`` 0.53 / 0.54;
``pointwise`` 0.14 and ``pairwise`` 0.05 (seed 0): the policy learns to write the right colour in broken
answers ("\\boxed{redredred", junk), which those judges pay (0.33 and 0.40 of malformed answers) and the
grader does not; ``pairwise_swap`` 0.004: it pays no right answer (0.00: two equal candidates) and 0.06 of
malformed ones, so only broken answers are paid.

Run from the repository root::

    nice -n 15 python -m benchmarks.judge_learning --seed 0 1
    nice -n 15 python -m benchmarks.judge_learning --stage reward --seed 0 --judge-seed 0
    nice -n 15 python -m benchmarks.judge_learning --stage reward --seed 1 --judge-seed 0 --mode pointwise_malformed gold
    python -m benchmarks.judge_learning --report
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from benchmarks.learning import ROOT, Recorder, adamw, answer_start, code_version, trainer

from vlrl.data import Files, PreferencePairs, RLDataModule, SFTDataModule, Synthetic, SyntheticPairs
from vlrl.data.synthetic import COLOURS
from vlrl.methods import GRPO, SFT, UnifiedRewardThink
from vlrl.models import Policy
from vlrl.models.tiny import resolve_model_path
from vlrl.rewards import AccuracyReward, HFReasoner, JudgeReward, PreferenceReward
from vlrl.rollout import Sampling

CACHE = ROOT / "outputs" / "benchmarks" / "judge_learning"
RESULTS = ROOT / "benchmarks" / "results" / "judge_learning.jsonl"
DOCS = ROOT / "docs"

PROMPT = (
    "Question: {question}\nAnswer 1: {answer1}\nAnswer 2: {answer2}\nWhich answer is better? Check each answer "
    "against the image inside <think></think>, then answer inside <answer></answer>."
)
COLD_PAIRS, COLD_STEPS = 2048, 200
RS_PAIRS, RS_STEPS = 512, 60
GRPO_STEPS, GRPO_EVERY = 24, 8
HELD_OUT = 128  # test pairs, each judged in both orders
TOKENS = 56  # a judgement is 41 tokens of the tiny tokenizer, + EOS
GREEDY = Sampling(temperature=0.0, max_new_tokens=TOKENS)
SAMPLED = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=TOKENS)


class ColourPairs(PreferencePairs):
    """Colour-question pairs of the renderer with the step-by-step judgement above as ``response``.

    Args:
        split: Which split to draw.
        size: Number of pairs.
        seed: Seed of the drawing (different seeds, different pairs).
    """

    def __init__(self, split: str, size: int, seed: int = 0) -> None:
        source = SyntheticPairs(split, size, seed=seed, tasks=["understanding"], kinds=["color"])
        super().__init__(source, understanding_prompt=PROMPT)

    def judge_record(self, record: Any, where: Any) -> dict[str, Any]:
        rng = random.Random(f"judge-learning/{record['id']}")
        plain = list(record["responses"])
        shown = [f"\\boxed{{{a}}}" if rng.random() < 0.5 else a for a in plain]
        row = super().judge_record({**record, "responses": shown}, where)
        better = int(row["answer"][7])  # "Answer 2 is better"
        gold = plain[better - 1]
        copies = " ".join(f"Answer {i + 1} {a}." for i, a in enumerate(plain))
        row["response"] = f"<think>{copies} The shape is {gold}.</think>\n<answer>{row['answer']}</answer>"
        return row


# ------------------------------------------------------------------------------ the stages


def sft(start: str, source: Any, steps: int, seed: int, out: Path) -> str:
    """``steps`` SFT steps (lr 1e-3, batch 32) from ``start``, saved to ``out``."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = SFT(Policy(start, dtype="float32"), optimizer=adamw(1e-3), max_length=256, micro_batch_size=32)
    data = SFTDataModule(train=source, batch_size=32, seed=seed)
    trainer(steps, []).fit(module, datamodule=data)
    module.model.save_pretrained(out)
    module.processor.save_pretrained(out)
    return str(out)


def judge(path: str, seed: int, **kwargs: Any) -> UnifiedRewardThink:
    """The judge at ``path`` as UnifiedReward-Think's GRPO module (greedy, order-swap evaluation)."""
    return UnifiedRewardThink(
        policy=Policy(path, dtype="float32"),
        rewards=[PreferenceReward(format_weight=1.0)],
        order_swap=True,
        eval_sampling=GREEDY,
        sampling=SAMPLED,
        rejection_sampling=Sampling(temperature=1.0, max_new_tokens=TOKENS),
        micro_batch_size=32,
        seed=seed,
        **kwargs,
    )


def held_out(seed: int, train: Any = None) -> RLDataModule:
    return RLDataModule(train=train, val=ColourPairs("test", HELD_OUT), batch_size=8, eval_batch_size=64, seed=seed)


def evaluate(path: str, seed: int) -> dict[str, float]:
    """Greedy judgements of the held-out pairs in both orders."""
    metrics = trainer(1, [], val_every=1).validate(judge(path, seed), datamodule=held_out(seed), verbose=False)[0]
    return {k.removeprefix("val/"): float(v) for k, v in metrics.items()}


def rejection_sampling(path: str, seed: int, out: Path) -> dict[str, int]:
    """Judge ``RS_PAIRS`` training pairs once each; the right judgements under ``out``, the wrong pairs in
    ``out/unkept``."""
    shutil.rmtree(out, ignore_errors=True)
    module = judge(path, seed, output_dir=str(out))
    data = RLDataModule(predict=ColourPairs("train", RS_PAIRS, seed=1), eval_batch_size=64, seed=seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    trainer(1, []).predict(module, datamodule=data, return_predictions=False)
    return {k: int(v) for k, v in module.predicted.items()}


def grpo(path: str, seed: int, unkept: Path) -> tuple[UnifiedRewardThink, Recorder]:
    """GRPO on the wrongly judged pairs; the paper's settings but the learning rate (a tiny model)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = judge(path, seed, advantage="std", advantage_eps=1e-4, kl_coef=0.04, optimizer=adamw(2e-4), group_size=8)
    data = held_out(seed, train=PreferencePairs(Files(str(unkept)), understanding_prompt=PROMPT))
    recorder = Recorder("reward/mean")
    trainer(GRPO_STEPS, [recorder], val_every=GRPO_EVERY).fit(module, datamodule=data)
    return module, recorder


def chain(seed: int) -> dict[str, Any]:
    """Cold start -> rejection sampling -> GRPO for one seed, evaluated after each stage."""
    out = CACHE / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for taught in ("pointwise", "pointwise_malformed"):  # taught from this seed's judge: retrain them
        shutil.rmtree(out / taught, ignore_errors=True)
    wall: dict[str, float] = {}
    start = time.perf_counter()
    cold = sft(resolve_model_path("tiny:qwen2_5_vl"), ColourPairs("train", COLD_PAIRS), COLD_STEPS, seed, out / "cold")
    wall["cold_start"] = time.perf_counter() - start
    stages = {"cold_start": evaluate(cold, seed)}
    print("cold start", stages["cold_start"], flush=True)
    start = time.perf_counter()
    counts = rejection_sampling(cold, seed, out / "rejection")
    kept = PreferencePairs(Files(str(out / "rejection")), understanding_prompt=PROMPT)
    rs = sft(cold, kept, RS_STEPS, seed, out / "rs") if counts.get("correct_pairs") else cold  # none right: no data
    wall["rejection_sampling"] = time.perf_counter() - start
    stages["rejection_sampling"] = evaluate(rs, seed)
    print("rejection sampling", counts, stages["rejection_sampling"], flush=True)
    start = time.perf_counter()
    module, recorder = grpo(rs, seed, out / "rejection" / "unkept")
    module.model.save_pretrained(out / "grpo")
    module.processor.save_pretrained(out / "grpo")
    wall["grpo"] = time.perf_counter() - start
    stages["grpo"] = evaluate(str(out / "grpo"), seed)
    print("grpo", stages["grpo"], flush=True)
    c = recorder.curves
    return {
        "run": "chain",
        "seed": seed,
        "held_out": HELD_OUT,
        "steps": {"cold_start": COLD_STEPS, "rejection_sampling": RS_STEPS, "grpo": GRPO_STEPS},
        "rejection": counts,
        "stages": stages,
        "grpo_curve": {"steps": c.steps, "rewards": c.rewards, "eval_steps": c.eval_steps, "accuracy": c.accuracy},
        "wall_s": wall,
        "commit": code_version(),
    }


# --------------------------------------------------------------------- the judge as a reward


class PolicyAccuracy(pl.Callback):
    """The policy's held-out accuracy after every validation (``val/accuracy``: exact match with the gold)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.accuracy: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)
        self.accuracy.append(float(trainer.callback_metrics["val/accuracy"]))


POINT_PROMPT = (
    "Question: {question}\nAnswer: {response}\nIs the answer right? Check it against the image inside "
    "<think></think>, then answer 1 (right) or 0 (wrong) inside <answer></answer>."
)
POINT_STEPS = 150  # SFT steps that teach the trained judge the pointwise prompt
REWARD_STEPS, REWARD_EVERY = 32, 8
MODES = ["pointwise", "pointwise_malformed", "pairwise", "pairwise_swap", "gold"]


class ColourAnswers(Synthetic):
    """Colour questions with one candidate answer each as pointwise judging prompts (``POINT_PROMPT``).

    The candidate is the right colour or a wrong one, written plainly or boxed, each at random; with
    ``malformed``, half of the candidates are instead broken the ways a policy paid by a judge breaks them
    (``malformed_answer``), judged ``Answer unclear.`` and 0. ``answer`` is ``1`` (right) or ``0``,
    ``response`` the templated judgement ``<think>Answer blue. The shape is red.</think>\\n<answer>0</answer>``,
    ``candidate`` the candidate and ``kind`` one of ``right``, ``wrong``, ``malformed``.

    Args:
        split: Which split to draw.
        size: Number of rows.
        malformed: Make half of the candidates malformed.
    """

    def __init__(self, split: str, size: int, malformed: bool = False) -> None:
        super().__init__(split, size, kinds=["color"])
        self.malformed = malformed

    def records(self) -> Iterator[Any]:
        for record in super().records():
            row = record.value
            rng = random.Random(f"judge-learning/pointwise/{row['id']}")
            gold = row["answer"]
            said = gold if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != gold])
            shown = f"\\boxed{{{said}}}" if rng.random() < 0.5 else said
            kind = "right" if said == gold else "wrong"
            if self.malformed and rng.random() < 0.5:
                shown, said, kind = malformed_answer(rng, said), "unclear", "malformed"
            right = int(kind == "right")
            row["question"] = POINT_PROMPT.format(question=row["question"], response=shown)
            row["response"] = f"<think>Answer {said}. The shape is {gold}.</think>\n<answer>{right}</answer>"
            row["answer"], row["candidate"], row["kind"] = str(right), shown, kind
            yield record


def malformed_answer(rng: random.Random, colour: str) -> str:
    """A broken answer of the kinds the policy wrote when paid by the judge of clean answers only.

    >>> malformed_answer(random.Random(0), "red")
    '\\\\boxed{redredredred}'
    """
    junk = "".join(rng.choice(string.ascii_letters + string.digits + " {}") for _ in range(rng.randint(3, 10)))
    other = rng.choice([c for c in COLOURS if c != colour])
    forms = [
        colour * rng.randint(2, 5),  # repeated
        f"\\boxed{{{colour * rng.randint(2, 5)}}}",
        f"\\boxed{{{colour}",  # not closed
        f"\\boxed{{{junk}{colour}",  # junk before the colour
        f"\\boxed{{{colour}{{{other}}}",  # two colours
        f"\\boxed{{{junk}",  # no colour at all
    ]
    return rng.choice(forms)


def pointwise_judge(judge_seed: int, malformed: bool) -> Path:
    """The trained judge of ``judge_seed`` after ``POINT_STEPS`` SFT steps on ``ColourAnswers`` (cached)."""
    out = CACHE / f"seed{judge_seed}" / ("pointwise_malformed" if malformed else "pointwise")
    if not (out / "config.json").exists():
        pl.seed_everything(judge_seed, workers=True, verbose=False)
        module = SFT(Policy(str(trained_judge(judge_seed)), dtype="float32"), optimizer=adamw(1e-3), max_length=256)
        data = SFTDataModule(train=ColourAnswers("train", 2048, malformed), batch_size=32, seed=judge_seed)
        trainer(POINT_STEPS, []).fit(module, datamodule=data)
        module.model.save_pretrained(out)
        module.processor.save_pretrained(out)
    return out


def trained_judge(judge_seed: int) -> Path:
    path = CACHE / f"seed{judge_seed}" / "grpo"
    if not (path / "config.json").exists():
        raise SystemExit(f"no trained judge at {path}: run `python -m benchmarks.judge_learning --seed {judge_seed}`")
    return path


def judge_reward(judge_seed: int, mode: str) -> JudgeReward:
    """The trained judge as ``JudgeReward``: ``pairwise`` (the response against the gold answer, the response
    first), ``pairwise_swap`` (both positions) or ``pointwise`` (``POINT_PROMPT``, score 1 or 0)."""
    if mode.startswith("pointwise"):
        return JudgeReward(
            HFReasoner(str(pointwise_judge(judge_seed, malformed=mode == "pointwise_malformed")), dtype="float32"),
            mode="pointwise",
            prompt=POINT_PROMPT,
            score_pattern=r"[01]",
            max_score=1.0,
            sampling=GREEDY,
            name="judge",
        )
    return JudgeReward(
        HFReasoner(str(trained_judge(judge_seed)), dtype="float32"),
        mode="pairwise",
        prompt=PROMPT,
        order_swap=mode == "pairwise_swap",
        sampling=GREEDY,
        name="judge",
    )


def reward_check(reward: JudgeReward, size: int = 256) -> dict[str, float]:
    """What the judge pays right, wrong and malformed answers (``ColourAnswers`` of the test split, mean reward;
    an unreadable verdict counts 0), before any policy training."""
    rows = [r.value for r in ColourAnswers("test", size, malformed=True).records()]
    scores = reward(
        [row["candidate"] for row in rows],
        answers=[row["response"].split("The shape is ")[1].split(".")[0] for row in rows],
        choices=[None] * size,
        finish_reasons=["stop"] * size,
        questions=["What colour is the shape?"] * size,
        images=[row["images"] for row in rows],
    )
    paid: dict[str, list[float]] = {"right": [], "wrong": [], "malformed": []}
    for row, score in zip(rows, scores, strict=True):
        paid[row["kind"]].append(0.0 if math.isnan(score) else score)
    return {f"{kind}_paid": sum(values) / len(values) for kind, values in paid.items()}


def judge_reward_run(seed: int, judge_seed: int, mode: str) -> dict[str, Any]:
    """GRPO of the warm-started tiny policy on the colour question, paid only by the trained judge (``gold``: by
    the gold answer instead, the control)."""
    reward, check = AccuracyReward(), None
    if mode != "gold":
        reward = judge_reward(judge_seed, mode)
        check = reward_check(reward)
        reward.counts.clear()  # the check's judgements are not the run's
    print(f"judge as reward ({mode}): {check}", flush=True)
    pl.seed_everything(seed, workers=True, verbose=False)
    module = GRPO(
        policy=Policy(answer_start(), dtype="float32"),
        rewards=[reward],
        advantage="std",
        optimizer=adamw(2e-4),
        sampling=Sampling(temperature=1.0, max_new_tokens=10),
        eval_sampling=Sampling(temperature=1.0, max_new_tokens=10),
        group_size=8,
        micro_batch_size=32,
        seed=seed,
    )
    data = RLDataModule(
        train=Synthetic("train", size=2048, kinds=["color"]),
        val=Synthetic("test", size=256, kinds=["color"]),
        batch_size=8,
        eval_batch_size=64,
        prompt_template="{question}\nPut your final answer within \\boxed{{}}.",
        seed=seed,
    )
    accuracy, recorder = PolicyAccuracy(), Recorder("reward/mean")
    start = time.perf_counter()
    run = trainer(REWARD_STEPS, [accuracy, recorder], val_every=REWARD_EVERY)
    run.validate(module, datamodule=data, verbose=False)
    run.fit(module, datamodule=data)
    return {
        "run": "judge_reward",
        "mode": mode,
        "seed": seed,
        "judge_seed": judge_seed,
        "held_out": 256,
        "judge_check": check,
        "eval_steps": accuracy.steps,
        "accuracy": accuracy.accuracy,
        "steps": recorder.curves.steps,
        "rewards": recorder.curves.rewards,
        "judge_counts": dict(reward.counts) if check is not None else {},
        "wall_s": time.perf_counter() - start,
        "commit": code_version(),
    }


# ------------------------------------------------------------------------------------ output


def save(result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(json.dumps(result) + "\n")


def latest(run: str) -> dict[tuple, dict]:
    """The latest recorded result of each (seed, mode) of one kind of run."""
    found: dict[tuple, dict] = {}
    if RESULTS.exists():
        for line in RESULTS.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["run"] == run:
                found[(row["seed"], row.get("mode", ""))] = row
    return found


STAGES = ["cold_start", "rejection_sampling", "grpo"]


def report() -> str:
    """The README table: per stage, held-out accuracy in both orders (and one order), consistency, format."""
    runs = [r for _, r in sorted(latest("chain").items())]
    lines = [
        "| stage | "
        + " | ".join(f"seed {r['seed']}: both orders / one order / consistency / format" for r in runs)
        + " |",
        "|---|" + "---|" * len(runs),
    ]
    for stage in STAGES:
        cells = []
        for r in runs:
            m = r["stages"][stage]
            cells.append(
                f"{m['accuracy']:.3f} / {m['accuracy_one_order']:.3f} / {m['position_consistency']:.3f} / "
                f"{m['format']:.3f}"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for r in runs:
        lines.append(f"\nseed {r['seed']}: rejection sampling {r['rejection']}; wall s {r['wall_s']}")
    for (seed, mode), r in sorted(latest("judge_reward").items()):
        check = r["judge_check"] or {"right_paid": 1.0, "wrong_paid": 0.0, "malformed_paid": 0.0}
        lines.append(
            f"\njudge reward ({mode}, seed {seed}): policy accuracy {r['accuracy'][0]:.3f} -> {r['accuracy'][-1]:.3f} "
            f"over {r['steps'][-1] if r['steps'] else 0} steps; judge pays right / wrong / malformed answers "
            f"{check['right_paid']:.3f} / {check['wrong_paid']:.3f} / {check.get('malformed_paid', float('nan')):.3f}; "
            f"judge counts {r['judge_counts']}"
        )
    return "\n".join(lines)


def plot_chain() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = latest("chain")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(STAGES))
    for i, ((seed, _), r) in enumerate(sorted(runs.items())):
        colour = f"C{i}"
        for key, style, name in (
            ("accuracy", "-", "both orders"),
            ("accuracy_one_order", ":", "one order"),
            ("position_consistency", "--", "consistency"),
        ):
            left.plot(
                x, [r["stages"][s][key] for s in STAGES], style, marker="o", color=colour, label=f"seed {seed} {name}"
            )
        c = r["grpo_curve"]
        right.plot(c["steps"], c["rewards"], color=colour, alpha=0.6, label=f"seed {seed} reward/mean")
    left.set_xticks(list(x), STAGES, fontsize=8)
    left.set(ylabel="held-out (greedy)", ylim=(0, 1.02), title=f"judge after each stage (n = {HELD_OUT} pairs)")
    right.set(xlabel="GRPO step", ylabel="accuracy + format", title="GRPO reward on wrongly judged pairs")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("UnifiedReward-Think: tiny judge, colour pairs, CPU")
    fig.tight_layout()
    path = DOCS / "learning_judge.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for i, ((seed, mode), r) in enumerate(sorted(latest("judge_reward").items())):
        check = r["judge_check"]
        pays = (
            ""
            if check is None
            else " pays right/wrong/malformed "
            + "/".join(f"{check.get(f'{kind}_paid', float('nan')):.2f}" for kind in ("right", "wrong", "malformed"))
        )
        style = dict(color="k", linestyle="--") if mode == "gold" else dict(color=f"C{i}")
        ax.plot(r["eval_steps"], r["accuracy"], marker="o", **style, label=f"{mode}, seed {seed}{pays}")
    ax.set(
        xlabel="GRPO step",
        ylabel="held-out accuracy (T = 1)",
        ylim=(0, 1),
        title="tiny policy on the colour question, paid by the trained judge",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    path = DOCS / "judge_reward_grpo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["chain", "reward"], default="chain")
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1], dest="seeds")
    parser.add_argument("--judge-seed", type=int, default=0, help="--stage reward: which seed's trained judge")
    parser.add_argument("--mode", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--report", action="store_true", help="print the table and redraw the figures")
    args = parser.parse_args(argv)
    if not args.report:
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            if args.stage == "chain":
                save(chain(seed))
            else:
                for mode in args.mode:
                    save(judge_reward_run(seed, args.judge_seed, mode))
    print(report())
    if latest("chain"):
        print(f"figure: {plot_chain().relative_to(ROOT)}")
    if latest("judge_reward"):
        print(f"figure: {plot_reward().relative_to(ROOT)}")


if __name__ == "__main__":
    main()
