"""UnifiedReward-Think: verdict parsing, the GRPO reward, pair rows, the rejection-sampling split, the judge as a reward."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from tests.test_grpo import quiet_trainer
from vlrl.cli import VLRLCLI
from vlrl.data import DataError, Files, PreferencePairs, RLDataModule, SFTDataModule, SyntheticPairs, make_pairs
from vlrl.data.preference import GENERATION_PROMPT, pair_label
from vlrl.data.trajectories import TrajectoryWriter
from vlrl.methods import UnifiedRewardThink
from vlrl.methods.reward_model import split_judgements
from vlrl.models import Policy
from vlrl.rewards import HFReasoner, JudgeReward, OpenAIReasoner, PreferenceReward, answer_tag, judged_correctly
from vlrl.rollout import Sampling

GOOD = "<think>Image 1 shows a red square.</think>\n<answer>Image 1 is better</answer>"


# ------------------------------------------------------------------------------ verdicts


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        (GOOD, "Image 1 is better"),
        ("<think>x</think><answer>Image 2 is better", None),  # no closing tag
        ("<think>x</think>Image 2 is better</answer>", None),  # no opening tag
        ("Sure! <answer>Answer 1 is better</answer> Hope this helps.", "Answer 1 is better"),  # extra text
        ("<answer>draft <answer>Image 2 is better</answer></answer>", "Image 2 is better"),  # nested: innermost
        ("<ANSWER>  image 1 IS better. </Answer>", "image 1 IS better."),  # tag case, spaces
        ("<answer>Image 1 is better</answer> wait <answer>Image 2 is better</answer>", "Image 2 is better"),  # last
        (
            "<think>maybe <answer>Image 2 is better</answer>?</think><answer>Image 1 is better</answer>",
            "Image 1 is better",
        ),
        ("no tags at all", None),
    ],
)
def test_answer_tag_on_messy_outputs(text, verdict):
    assert answer_tag(text) == verdict


def test_judged_correctly_normalises_case_space_and_punctuation():
    assert judged_correctly("<answer>  IMAGE 1   is better!! </answer>", "Image 1 is better")
    assert judged_correctly("<answer>**Answer 2 is better.**</answer>", "Answer 2 is better")
    assert not judged_correctly("<answer>Image 1 is better</answer>", "Image 2 is better")
    assert not judged_correctly("<answer>Image 1</answer>", "Image 1 is better")
    assert not judged_correctly("Image 1 is better", "Image 1 is better")  # a verdict needs its tag


def test_preference_reward_is_accuracy_plus_format_hand_worked():
    completions = [
        GOOD,  # right verdict, right format: 1 + 1
        "<think>x</think><answer>Image 2 is better</answer>",  # wrong verdict, right format: 0 + 1
        "<answer>Image 1 is better</answer>",  # right verdict, no <think>: 1 + 0
        "<think>x</think><answer>Image 1 is better</answer> trailing text",  # right verdict, text after: 1 + 0
        "<think>a\nb</think>\n\n<answer>image 1 is better.</answer>\n",  # newlines (dotall), normalised: 1 + 1
        "<THINK>x</THINK><answer>Image 1 is better</answer>",  # the format's tags are case-sensitive: 1 + 0
        "<think>x</think>",  # no verdict: 0 + 0
    ]
    n = len(completions)
    rewards = PreferenceReward()(
        completions, answers=["Image 1 is better"] * n, choices=[None] * n, finish_reasons=["stop"] * n
    )
    assert rewards == [2.0, 1.0, 1.0, 1.0, 2.0, 1.0, 0.0]
    half = PreferenceReward(format_weight=0.5)(
        completions[:2], answers=["Image 1 is better"] * 2, choices=[None] * 2, finish_reasons=["stop"] * 2
    )
    assert half == [1.5, 0.5]


def test_grpo_advantages_use_the_papers_epsilon():
    """G = 4 judgements with rewards 2, 1, 0, 1: mean 1, unbiased std sqrt(2/3) = 0.816497, eps 1e-4."""
    module = UnifiedRewardThink(policy=Policy("tiny:qwen2_5_vl"), rewards=[PreferenceReward()], group_size=4)
    rollout = SimpleNamespace(
        rewards=torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_index=torch.tensor([0] * 4 + [1] * 4)
    )
    advantages = module.compute_advantages(rollout)
    expected = 1.0 / (math.sqrt(2 / 3) + 1e-4)  # 1 / 0.816597 = 1.224595 (with GRPO's 1e-6: 1.224743)
    assert torch.allclose(advantages, torch.tensor([expected, 0.0, -expected, 0.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)
    assert advantages[0].item() == pytest.approx(1.224595, abs=1e-6)


# ----------------------------------------------------------------------------- pair rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_pair_labels_and_ties():
    assert pair_label(" image 2 is BETTER. ", "generation") == "Image 2 is better"
    assert pair_label(1, "understanding") == "Answer 1 is better"
    assert pair_label("2", "understanding") == "Answer 2 is better"
    for tie in ("Both are equally good", "tie", "The two answers are equal", 0):
        with pytest.raises(DataError, match="tie") as error:
            pair_label(tie, "understanding")
        assert error.value.reason == "tie_label"
    with pytest.raises(DataError, match="label of the understanding task"):
        pair_label("Answer 1 is better", "generation")


def test_bad_pair_rows_fail_with_their_line_or_are_skipped_and_counted(tmp_path):
    image = tmp_path / "a.png"
    make_pairs("train", 1)[0]["images"][0].save(image)
    good = {"question": "What colour?", "image": "a.png", "responses": ["red", "blue"], "label": "Answer 1 is better"}
    rows = [
        good,
        {**good, "label": "Both are equally good"},  # line 2: a tie
        {"caption": "a red square", "images": ["a.png"], "label": "Image 1 is better"},  # line 3: one image
        {**good, "responses": ["red"]},  # line 4: one candidate
        {**good, "label": "Image 1 is better"},  # line 5: the other task's label
        {"caption": "a red square", "images": ["a.png", "a.png"], "label": 2, "task": "generation"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: field 'label' .*tie"):
        PreferencePairs(Files(str(path))).load()
    data = RLDataModule(predict=PreferencePairs(Files(str(path))), on_bad_row="skip", eval_batch_size=8)
    with pytest.warns(UserWarning, match="Skipped 4 bad row"):
        data.setup("predict")
    assert data.skipped_rows == {
        "predict/tie_label": 1,
        "predict/image_mismatch": 1,
        "predict/missing_candidate": 1,
        "predict/wrong_label": 1,
    }
    batch = next(iter(data.predict_dataloader()))
    assert batch.answers == ["Answer 1 is better", "Image 2 is better"]
    assert batch.data_sources == ["understanding", "generation"]
    assert [len(images) for images in batch.images] == [1, 2]
    text = batch.messages[1][-1]["content"][-1]["text"]
    assert text == GENERATION_PROMPT.format(caption="a red square")
    assert [part["type"] for part in batch.messages[1][-1]["content"]] == ["image", "image", "text"]
    assert "Answer 1: red\n\nAnswer 2: blue" in batch.messages[0][-1]["content"][-1]["text"]


def test_real_chosen_rejected_pairs_from_math_v(shared_data):
    """39 real MATH-V pairs (chosen = graded correct, rejected = wrong): both orders occur, labels follow the order."""
    path = shared_data / "preference" / "mathv_pairs.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    data = RLDataModule(predict=PreferencePairs(Files(str(path))), eval_batch_size=64)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert len(batch) == len(raw) == 39
    assert set(batch.answers) == {"Answer 1 is better", "Answer 2 is better"}
    for i, row in enumerate(raw):
        better = batch.extras[i]["responses"][int(batch.answers[i][7]) - 1]
        assert better == row["chosen"]["response"].strip()
        assert batch.images[i][0].mode == "RGB" and "<image1>" not in batch.messages[i][-1]["content"][-1]["text"]
    choice_row = next(i for i, row in enumerate(raw) if row["options"])
    assert "\nA. " in batch.messages[choice_row][-1]["content"][-1]["text"]  # options shown with the question


def test_synthetic_pairs_are_deterministic_and_their_judgements_score_full_reward():
    pairs = make_pairs("train", 12, seed=3)
    again = make_pairs("train", 12, seed=3)
    assert [p["label"] for p in pairs] == [p["label"] for p in again]
    assert all(a["images"][0].tobytes() == b["images"][0].tobytes() for a, b in zip(pairs, again, strict=True))
    assert {p["task"] for p in pairs} == {"generation", "understanding"}
    assert len({p["label"] for p in pairs}) == 4  # both positions win in both tasks
    labels = [p["label"] for p in pairs]
    rewards = PreferenceReward()(
        [p["response"] for p in pairs], answers=labels, choices=[None] * 12, finish_reasons=["stop"] * 12
    )
    assert rewards == [2.0] * 12
    drawings = {p["images"][0].tobytes() for p in make_pairs("train", 40, tasks=["generation"])}
    assert not drawings & {p["images"][0].tobytes() for p in make_pairs("test", 40, tasks=["generation"])}


# ---------------------------------------------------------------------- rejection sampling


def test_rejection_sampling_split_is_exact_and_resumes(tmp_path):
    data = RLDataModule(predict=PreferencePairs(SyntheticPairs("val", 4)), eval_batch_size=4)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    wrong = {"Image 1 is better": "Image 2 is better", "Answer 1 is better": "Answer 2 is better"}
    wrong |= {v: k for k, v in wrong.items()}
    judgements = [
        [f"<think>t</think><answer>{batch.answers[0]}</answer>"],  # right
        [f"<think>t</think><answer>{wrong[batch.answers[1]]}</answer>"],  # wrong verdict
        [f"<think>t</think>{batch.answers[2]}"],  # no verdict tag: wrong
        [f"<ANSWER>{batch.answers[3].upper()}.</ANSWER>"],  # right (messy)
    ]
    assert split_judgements(judgements, batch.answers) == [[0], [], [], [0]]
    module = UnifiedRewardThink(
        policy=Policy("tiny:qwen2_5_vl"), rewards=[PreferenceReward()], output_dir=str(tmp_path), group_size=2
    )
    module.writer = TrajectoryWriter(tmp_path)
    assert module.record_judgements(batch, judgements) == 2
    kept = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    unkept = [json.loads(line) for line in (tmp_path / "unkept" / "rank0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == [batch.ids[0], batch.ids[3]]
    assert [r["id"] for r in unkept] == [batch.ids[1], batch.ids[2]]
    assert [r["response"] for r in kept] == [judgements[0][0], judgements[3][0]]
    assert [r["judgements"] for r in unkept] == [judgements[1], judgements[2]]

    # the correct ones train as SFT rows, the wrong ones as GRPO prompts, with the same chat and images
    sft = SFTDataModule(train=PreferencePairs(Files(str(tmp_path))), batch_size=2, shuffle=False)
    sft.setup("fit")
    sft_batch = next(iter(sft.train_dataloader()))
    assert sft_batch.messages[0][-1] == {"role": "assistant", "content": [{"type": "text", "text": judgements[0][0]}]}
    assert sft_batch.messages[0][:-1] == batch.messages[0]
    assert sft_batch.images[0][0].tobytes() == batch.images[0][0].tobytes()
    grpo = RLDataModule(train=PreferencePairs(Files(str(tmp_path / "unkept"))), batch_size=2, shuffle=False)
    grpo.setup("fit")
    grpo_batch = next(iter(grpo.train_dataloader()))
    assert grpo_batch.answers == [batch.answers[1], batch.answers[2]]
    assert grpo_batch.messages == [batch.messages[1], batch.messages[2]]
    assert [len(i) for i in grpo_batch.images] == [len(batch.images[1]), len(batch.images[2])]

    # a rerun skips what is written (an interrupted last line is cut off and its pair judged again)
    with (tmp_path / "unkept" / "rank0.jsonl").open("a") as file:
        file.write('{"id": "half a line')
    module.on_predict_start()
    assert module.writer.done == set(batch.ids)
    assert module.predict_step(batch, 0) == 0  # nothing left to judge: no generation at all


# ----------------------------------------------------------------------- the judge as a reward


def test_judge_reward_verdicts_and_construction_checks():
    judge = HFReasoner("tiny:qwen2_5_vl")
    first = JudgeReward(judge)
    second = JudgeReward(judge, response_position="second")
    assert first.verdict_score("<think>x</think><answer>Answer 1 is better</answer>") == 1.0
    assert first.verdict_score("<answer>answer 2 is better.</answer>") == 0.0
    assert second.verdict_score("<answer>Answer 2 is better</answer>") == 1.0
    assert math.isnan(first.verdict_score("<answer>Image 1 is better</answer>"))  # not a verdict on answers
    assert math.isnan(first.verdict_score("Answer 1 is better"))  # no tag
    pointwise = JudgeReward(judge, mode="pointwise", max_score=10)
    assert pointwise.verdict_score("<think>3 issues</think><answer>Score: 7</answer>") == 0.7
    assert pointwise.verdict_score("clarity 6, overall 8.5") == pytest.approx(0.85)  # no tag: last number
    assert math.isnan(pointwise.verdict_score("<answer>great</answer>"))
    messages = second.messages("What colour?<image1>", " red ", "blue", num_images=1)
    assert messages[-1]["content"][0] == {"type": "image"}
    assert "Answer 1: blue\n\nAnswer 2: red" in messages[-1]["content"][1]["text"]
    with pytest.raises(ValueError, match="show_images"):
        JudgeReward(OpenAIReasoner("http://localhost:1/v1", "judge"))
    with pytest.raises(ValueError, match="lacks the field"):
        JudgeReward(judge, mode="pointwise", prompt="{question} only")


JUDGE_GRPO_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
model:
  class_path: vlrl.methods.GRPO
  init_args:
    policy: {model_path: "tiny:qwen2_5_vl", dtype: float32}
    rewards:
      - class_path: vlrl.rewards.AccuracyReward
      - class_path: vlrl.rewards.JudgeReward
        init_args:
          judge:
            class_path: vlrl.rewards.HFReasoner
            init_args: {model_path: "tiny:qwen2_5_vl", dtype: float32}
          sampling: {temperature: 1.0, max_new_tokens: 6}
          weight: 0.5
    sampling: {temperature: 1.0, max_new_tokens: 6}
    group_size: 2
    micro_batch_size: 4
data:
  class_path: vlrl.data.RLDataModule
  init_args:
    train:
      class_path: vlrl.data.Synthetic
      init_args: {split: train, size: 4}
    batch_size: 2
"""


def test_judge_reward_plugs_into_grpo_through_yaml(tmp_path, monkeypatch):
    config = tmp_path / "judge_grpo.yaml"
    config.write_text(JUDGE_GRPO_CONFIG)
    monkeypatch.setattr(sys, "argv", ["lightning-cli"])
    cli = VLRLCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reward/")})

    cli.trainer.callbacks.append(Spy())
    cli.trainer.fit(cli.model, cli.datamodule)
    judge_reward = cli.model.rewards[1]
    assert isinstance(judge_reward, JudgeReward)
    assert cli.trainer.global_step == 2
    assert judge_reward.counts["judged"] == 2 * 2 * 2  # 2 steps x 2 prompts x G = 2, in one batch per step
    assert judge_reward.judge.model is not None
    # the judge is held outside the module tree: not a parameter of the policy, never in a checkpoint
    assert not any(k.startswith("rewards") for k in cli.model.state_dict())
    assert not any(p is q for p in judge_reward.judge.model.parameters() for q in cli.model.parameters())
    assert not any(p.requires_grad for p in judge_reward.judge.model.parameters())
    # a random judge gives no verdicts: counted as failures of the reward, the run goes on
    assert judge_reward.counts["unparseable"] == judge_reward.counts["judged"]
    assert [step["reward/failures/judge"] for step in seen] == [1.0, 1.0]


def test_pairwise_accuracy_per_task_kind_on_a_held_out_set(tmp_path):
    model = UnifiedRewardThink(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"),
        rewards=[PreferenceReward()],
        sampling=Sampling(temperature=1.0, top_p=0.95, max_new_tokens=6),
        group_size=2,
        micro_batch_size=4,
        kl_coef=0.04,
    )
    data = RLDataModule(
        train=PreferencePairs(SyntheticPairs("train", 4)),
        test=PreferencePairs(SyntheticPairs("test", 6)),
        batch_size=2,
        eval_batch_size=6,
    )
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, data)
    assert trainer.global_step == 1 and "update/kl_ref" in trainer.callback_metrics
    trainer.test(model, data, verbose=False)
    metrics = trainer.callback_metrics
    for key in ("test/accuracy", "test/accuracy/generation", "test/accuracy/understanding", "test/format"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["test/accuracy"]) <= 1.0


def test_synthetic_pairs_of_chosen_question_kinds():
    pairs = make_pairs("train", 6, tasks=["understanding"], kinds=["color"])
    assert all(p["question"] == "What colour is the shape?" for p in pairs)
    assert all(set(p["responses"]) <= {"red", "green", "blue", "yellow"} for p in pairs)
    with pytest.raises(ValueError, match=r"kinds=\['size'\]"):
        SyntheticPairs("train", 2, kinds=["size"])
