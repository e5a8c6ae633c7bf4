"""SOPHIA on CPU: the keep rule, visual rewards, trained tokens and weights, frozen vision, the offline round trip.

The reasoner is real in every test: the tiny random Qwen2 (``HFReasoner``) or ``OpenAIReasoner`` talking HTTP to
``tests/openai_server.py``, a loopback server whose answers are canned (a fixed word, or a word chosen by the parity
of the prompt's length; some answers marked truncated), so which trajectories are right is known in advance. The
policy's descriptions are real samples of the tiny random Qwen2.5-VL.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.openai_server import ServerProcess
from tests.test_grpo import quiet_trainer
from vlrl.cli import main
from vlrl.data import Files, RLDataModule, SFTDataModule
from vlrl.data.prompts import collate_prompts
from vlrl.data.trajectories import written_ids
from vlrl.methods import SOPHIA
from vlrl.methods.sophia import (
    LONG_COT_SYSTEM_PROMPT,
    SemiOffPolicyStep,
    clipped_importance_weights,
    select_trajectories,
    visual_rewards,
)
from vlrl.models import Policy
from vlrl.rewards import CaptionReward, HFReasoner, OpenAIReasoner
from vlrl.rewards.reasoners import ReasonerOutput
from vlrl.rollout import Sampling

pytestmark = pytest.mark.timeout(300)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEMPLATE = "{question}\nAnswer in \\boxed{{}}."
SERVED = "<think>From the caption.</think> The answer is \\boxed{{{}}}."  # what the test server answers


def make_sophia(reasoner, **overrides) -> SOPHIA:
    kwargs = dict(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"),
        visual_reward=CaptionReward(reasoner, samples_per_caption=2, sampling=Sampling(max_new_tokens=8)),
        descriptions_per_image=2,
        description_sampling=Sampling(temperature=1.0, max_new_tokens=8),
        eval_sampling=Sampling(temperature=0.0, max_new_tokens=8),
        max_length=256,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        seed=3,
    )
    kwargs.update(overrides)
    return SOPHIA(**kwargs)


def http_reasoner(server: ServerProcess) -> OpenAIReasoner:
    return OpenAIReasoner(
        server.base_url, "served", api_key_env=None, timeout_s=30, max_retries=0, max_concurrency=1, max_n=1
    )  # one request per trajectory, in order: the server's scripted actions apply per trajectory


def write_rows(folder: Path, count: int, answer: str = "red") -> Path:
    """``count`` image questions whose gold answer is ``answer``, as JSONL + PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        Image.new("RGB", (56, 56), (40 * i % 255, 80, 200)).save(folder / f"{i}.png")
        row = {"id": f"q{i}", "images": [f"{i}.png"], "question": f"What colour is shape {i}?", "answer": answer}
        lines.append(json.dumps(row))
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "rows.jsonl"


def rl_data(path: Path, split: str = "train", batch_size: int = 2) -> RLDataModule:
    return RLDataModule(**{split: Files(str(path))}, batch_size=batch_size, prompt_template=TEMPLATE, shuffle=False)


def first_batch(path: Path, count: int):
    dataset = rl_data(path).dataset("train")
    return collate_prompts([dataset[i] for i in range(count)])


# ------------------------------------------------------------------------------- the math


def test_keep_one_takes_the_shortest_correct_trajectory_of_descriptions_above_alpha():
    correct = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # [K=3, N=4]
    lengths = torch.tensor([[5.0, 2.0, 9.0, 1.0], [7.0, 3.0, 3.0, 8.0], [1.0, 1.0, 1.0, 1.0]])
    assert visual_rewards(correct).tolist() == [0.75, 1.0, 0.25]
    # alpha 0.7: descriptions 0 and 1 qualify; the wrong length-1 sample and description 2's length-1 one do not
    assert select_trajectories(correct, lengths, 0.7, "one") == [(0, 1)]
    assert select_trajectories(correct, lengths, 0.7, "all") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    # R(c) > alpha is strict: at 0.75 description 0 drops out, and of the tie at length 3 the first sample wins
    assert select_trajectories(correct, lengths, 0.75, "one") == [(1, 1)]
    assert select_trajectories(correct, lengths, 0.75, "all") == [(1, 0), (1, 1), (1, 2), (1, 3)]


def test_keep_rule_with_no_description_above_alpha_and_with_all_correct():
    lengths = torch.tensor([[4.0, 6.0], [4.0, 2.0]])
    assert select_trajectories(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), lengths, 0.75, "one") == []
    assert select_trajectories(torch.zeros(2, 2), lengths, 0.0, "all") == []
    every = torch.ones(2, 2)
    assert select_trajectories(every, lengths, 0.75, "one") == [(1, 1)]
    assert select_trajectories(every, torch.full((2, 2), 5.0), 0.75, "one") == [(0, 0)]  # all tied: the first
    assert len(select_trajectories(every, lengths, 0.75, "all")) == 4


def test_clipped_importance_weights_by_hand():
    policy = torch.tensor([math.log(0.2), math.log(0.5), math.log(0.3)])
    behaviour = torch.tensor([math.log(0.4), math.log(0.25), math.log(0.3)])
    assert clipped_importance_weights(policy, behaviour, 0.2).tolist() == pytest.approx([0.5, 1.2, 1.0])


def test_bad_settings_fail_at_construction():
    reasoner = HFReasoner("tiny:qwen2")
    with pytest.raises(ValueError, match=r"alpha=1.0 must be in \[0, 1\)"):
        make_sophia(reasoner, alpha=1.0)
    with pytest.raises(ValueError, match="keep='best' must be 'one'"):
        make_sophia(reasoner, keep="best")
    with pytest.raises(ValueError, match="descriptions_per_image=0 must be >= 1"):
        make_sophia(reasoner, descriptions_per_image=0)
    with pytest.raises(ValueError, match="importance_weight='clipped' needs the reasoner's token log-probs"):
        make_sophia(OpenAIReasoner("http://localhost:1/v1", "m"), importance_weight="clipped")
    with pytest.raises(ValueError, match="train_vision=true contradicts policy.freeze_vision=true"):
        make_sophia(reasoner, train_vision=True, policy=Policy("tiny:qwen2_5_vl", freeze_vision=True))
    assert make_sophia(reasoner).policy.freeze_vision  # frozen by default, as in the paper


# ------------------------------------------------------------------------- the stages


def test_visual_rewards_and_selection_from_a_real_reasoner(tmp_path):
    """B=2 questions, K=2 real descriptions, N=2 trajectories each. The server boxes 7 when the reasoner prompt has
    an even length, else 0 (so both trajectories of a description agree), and marks its 2nd answer truncated."""
    batch = replace(first_batch(write_rows(tmp_path, 2), 2), answers=["7", "7"])
    with ServerProcess(parity="7,0", actions=["ok", "truncated"]) as server:
        module = make_sophia(http_reasoner(server), alpha=0.4)
        module.configure_model()
        module.setup_reasoner()
        step = module.semi_off_policy(batch, seed=11)
        requests = server.log()["requests"]
    users = [r["body"]["messages"][-1]["content"] for r in requests]
    assert len(users) == 8  # B*K*N, in one batched call, in order
    descriptions = [d for per_question in step.descriptions for d in per_question]
    expected_users = module.visual_reward.build_prompts(
        [d for d in descriptions for _ in range(2)], [batch.questions[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)], [None] * 8
    )
    assert users == [p[-1]["content"] for p in expected_users]
    assert all("What colour" in u and "Answer in" not in u for u in users)  # the raw question, not the template
    even = torch.tensor([len(u) % 2 == 0 for u in users], dtype=torch.float32)
    even[1] = 0.0  # the truncated answer scores 0 even if right
    assert step.correct.flatten().tolist() == even.tolist()
    assert step.visual_rewards.tolist() == even.view(2, 2, 2).mean(dim=-1).tolist()
    for i in range(2):  # the keep rule on those rewards (server answers all have the same length: the first wins)
        assert step.selected[i] == select_trajectories(step.correct[i], step.lengths[i], 0.4, "one")
    metrics = step.metrics(alpha=0.4)
    assert metrics["sophia/visual_reward_mean"] == pytest.approx(float(even.mean()))
    assert metrics["reasoner/accuracy"] == pytest.approx(float(even.mean()))
    assert metrics["sophia/kept_question_frac"] == sum(bool(s) for s in step.selected) / 2
    assert metrics["sophia/kept_length"] in (0.0, 7.0)  # the server counts 7 words per answer


def constructed_step(texts: list[str], correct: list[float]) -> SemiOffPolicyStep:
    """One question, K=len(texts) descriptions, N=1 trajectory each, the given texts and grades."""
    k = len(texts)
    return SemiOffPolicyStep(
        descriptions=[[f"description {i}" for i in range(k)]],
        description_lengths=torch.ones(1, k),
        description_truncated=torch.zeros(1, k),
        correct=torch.tensor(correct).view(1, k, 1),
        lengths=torch.tensor([float(len(t)) for t in texts]).view(1, k, 1),
        outputs=[[[ReasonerOutput(t, "stop", len(t))] for t in texts]],
        selected=[select_trajectories(torch.tensor(correct).view(k, 1), torch.ones(k, 1), 0.5, "all")],
        reasoner_stats={},
    )


def test_rows_train_only_the_trajectory_tokens_with_weight_and_system_prompt(tmp_path):
    batch = first_batch(write_rows(tmp_path, 1), 1)
    module = make_sophia(HFReasoner("tiny:qwen2", dtype="float32"), keep="all")
    module.configure_model()
    texts = ["<think>red square</think> so \\boxed{red}", "It is \\boxed{blue}", "plain answer \\boxed{red}"]
    rows = module.trajectory_rows(batch, constructed_step(texts, [1.0, 0.0, 1.0]))
    assert rows.ids == ["q0#0", "q0#1"] and [e["weight"] for e in rows.extras] == [1.0, 1.0]
    assert [e["description"] for e in rows.extras] == ["description 0", "description 2"]
    think, plain = rows.messages
    assert think[0]["content"][0]["text"] == LONG_COT_SYSTEM_PROMPT  # a <think> trajectory gets the long-CoT prompt
    assert plain[:-1] == batch.messages[0]  # the others keep the datamodule's prompt
    assert plain[-1] == {"role": "assistant", "content": [{"type": "text", "text": texts[2]}]}
    samples, _ = module.encode(rows)
    tokenizer = module.processor.tokenizer
    for sample, text in zip(samples, (texts[0], texts[2]), strict=True):
        trained = sample.target_ids[sample.loss_mask.bool()]
        assert tokenizer.decode(trained) == text + "<|im_end|>"  # the trajectory and its end-of-turn, nothing else
        assert "description" not in tokenizer.decode(sample.prompt.token_inputs["input_ids"][0])  # never shown


def test_clipped_weights_come_from_the_policy_and_the_reasoner(tmp_path):
    """Tiny Qwen2.5-VL policy and tiny Qwen2 reasoner share a tokenizer: w = clip(exp(mean π − mean μ), 0, 1.2)."""
    batch = first_batch(write_rows(tmp_path, 1), 1)
    module = make_sophia(HFReasoner("tiny:qwen2", dtype="float32"), keep="all", importance_weight="clipped")
    module.configure_model()
    module.setup_reasoner()
    rows = module.trajectory_rows(batch, constructed_step(["so \\boxed{red}", "\\boxed{red} it is"], [1.0, 1.0]))
    weights = [e["weight"] for e in rows.extras]
    assert weights == [e["importance_weight"] for e in rows.extras]  # R(y) = 1
    assert all(0.0 <= w <= 1.2 for w in weights) and weights[0] != weights[1]


def test_a_step_trains_the_language_model_and_leaves_vision_and_reasoner_alone(tmp_path):
    path = write_rows(tmp_path, 4)
    with ServerProcess(answer="red") as server:  # every trajectory is right: R(c) = 1, one kept per question
        module = make_sophia(http_reasoner(server))
        module.configure_model()
        before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=rl_data(path))
    assert trainer.global_step == 1
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(".visual." in n for n in changed)
    assert all(not p.requires_grad for n, p in module.model.named_parameters() if ".visual." in n)
    metrics = trainer.callback_metrics
    assert metrics["sophia/kept_question_frac"] == 1.0 and metrics["reasoner/accuracy"] == 1.0
    assert metrics["sophia/visual_reward_mean"] == 1.0 and metrics["sophia/kept_trajectories"] == 2.0
    assert metrics["update/skipped"] == 0.0 and metrics["train/loss"] > 0
    assert metrics["sophia/kept_length"] == 7.0


def test_a_step_with_nothing_kept_counts_but_changes_nothing(tmp_path):
    module = make_sophia(HFReasoner("tiny:qwen2", dtype="float32"))  # random: never right
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=rl_data(write_rows(tmp_path, 4)))
    assert trainer.global_step == 2
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    assert trainer.callback_metrics["update/skipped"] == 1.0
    assert trainer.callback_metrics["sophia/kept_question_frac"] == 0.0


# ----------------------------------------------------------------------- the offline pass


def predict_overlay(tmp_path: Path, server: ServerProcess, rows: Path, out: Path) -> Path:
    reasoner = {
        "class_path": "vlrl.rewards.OpenAIReasoner",
        "init_args": {"base_url": server.base_url, "model": "served", "api_key_env": None, "max_concurrency": 4},
    }
    overlay = {
        "trainer": {"enable_progress_bar": False, "logger": False, "default_root_dir": str(tmp_path)},
        "model": {"init_args": {"output_dir": str(out), "visual_reward": {"init_args": {"reasoner": reasoner}}}},
        "data": {"init_args": {"predict": {"class_path": "vlrl.data.Files", "init_args": {"path": str(rows)}}}},
    }
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def test_predict_writes_resumable_jsonl_that_the_sft_config_trains_on(tmp_path):
    rows = write_rows(tmp_path / "data", 6)
    out = tmp_path / "offline"
    with ServerProcess(answer="red") as server:
        overlay = predict_overlay(tmp_path, server, rows, out)
        main(["predict", "--config", str(CONFIGS / "demo" / "sophia.yaml"), "--config", str(overlay)])
        first_requests = sum(r["body"]["n"] for r in server.log()["requests"])  # answers (N per request)
        kept = (out / "rank0.jsonl").read_text().splitlines()
        assert [json.loads(line)["source_id"] for line in kept] == [f"q{i}" for i in range(6)]
        # an interruption: the last two questions never written, the one before cut mid-line
        (out / "rank0.jsonl").write_text("\n".join(kept[:3]) + "\n" + kept[3][:40])
        assert written_ids(out) == {"q0", "q1", "q2"}
        main(["predict", "--config", str(CONFIGS / "demo" / "sophia.yaml"), "--config", str(overlay)])
        second_requests = sum(r["body"]["n"] for r in server.log()["requests"]) - first_requests
    assert first_requests == 6 * 4 * 4  # questions x K descriptions x N trajectories (the demo config's K, N)
    assert second_requests == 3 * 4 * 4  # only the three questions not written
    lines = [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]
    assert sorted(line["source_id"] for line in lines) == [f"q{i}" for i in range(6)]  # each once, none partial
    row = lines[0]
    assert row["weight"] == 1.0 and row["visual_reward"] == 1.0 and row["answer"] == "red"
    assert row["messages"][-1]["content"][0]["text"] == SERVED.format("red")
    assert row["messages"][0]["content"][0]["text"] == LONG_COT_SYSTEM_PROMPT
    assert (out / row["images"][0]).is_file() and not (out / "unkept" / "rank0.jsonl").exists()

    sft_overlay = tmp_path / "sft.yaml"
    sft_overlay.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_steps": 2,
                    "enable_progress_bar": False,
                    "callbacks": [],
                    "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path),
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(tmp_path), "name": "sft"},
                    },
                },
                "data": {"init_args": {"train": {"class_path": "vlrl.data.Files", "init_args": {"path": str(out)}}}},
            }
        )
    )
    main(["fit", "--config", str(CONFIGS / "demo" / "sophia_offline.yaml"), "--config", str(sft_overlay)])
    logged = [
        row for row in csv.DictReader((tmp_path / "sft" / "version_0" / "metrics.csv").open()) if row["train/loss"]
    ]
    assert len(logged) == 2 and all(float(row["train/loss"]) > 0 for row in logged)  # two SFT steps on the rows
    data = SFTDataModule(train=Files(str(out)), batch_size=6, shuffle=False)
    batch = collate_prompts([data.dataset("train")[i] for i in range(6)])
    assert [e["weight"] for e in batch.extras] == [1.0] * 6
    assert all(m[-1]["role"] == "assistant" for m in batch.messages) and all(len(i) == 1 for i in batch.images)


def test_unkept_questions_are_recorded_apart_and_not_redone(tmp_path):
    rows = write_rows(tmp_path / "data", 2)
    out = tmp_path / "offline"
    with ServerProcess(answer="blue") as server:  # every trajectory wrong: nothing kept
        overlay = predict_overlay(tmp_path, server, rows, out)
        for _ in range(2):
            main(["predict", "--config", str(CONFIGS / "demo" / "sophia.yaml"), "--config", str(overlay)])
        answers = sum(r["body"]["n"] for r in server.log()["requests"])  # N answers per request
    assert answers == 2 * 4 * 4  # the second run had nothing left to do
    assert not (out / "rank0.jsonl").exists() and not list((out / "images").iterdir())
    unkept = [json.loads(line) for line in (out / "unkept" / "rank0.jsonl").read_text().splitlines()]
    assert [u["source_id"] for u in unkept] == ["q0", "q1"] and unkept[0]["visual_rewards"] == [0.0] * 4


def test_the_long_cot_prompt_keys_on_a_whole_think_block():
    """A trajectory that opens a think block and closes it gets the long-CoT system prompt; one that only mentions
    <think>, or closes a block it never opened (a dangling </think>), does not."""
    module = make_sophia(HFReasoner("tiny:qwen2"))  # nothing is loaded by the constructor
    question = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]}]
    whole = "<think>\nRed, I see.\n</think>\n\nIt is \\boxed{red}."
    for text, long_cot in ((whole, True), ("Use <think> tags? No: \\boxed{red}", False), ("Red.</think> red", False)):
        messages = module.policy_messages(question, text)
        assert (messages[0]["role"] == "system") is long_cot, text
        assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_the_offline_schedule_decays_to_a_quarter_over_the_rows_written(tmp_path):
    """1,100 kept rows (two ranks' files), batch 512, 1 epoch: 3 steps; factor 1, 0.8125, 0.4375, then 0.25 for good
    (cos(pi/3) = 0.5, cos(2pi/3) = -0.5); the unkept/ folder is not counted."""
    from vlrl.methods.sophia import OfflineCosine

    (tmp_path / "unkept").mkdir()
    (tmp_path / "rank0.jsonl").write_text('{"id": 1}\n' * 600)
    (tmp_path / "rank1.jsonl").write_text('{"id": 2}\n' * 500)
    (tmp_path / "unkept" / "rank0.jsonl").write_text('{"id": 3}\n' * 5000)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    schedule = OfflineCosine(optimizer, str(tmp_path), global_batch_size=512)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert schedule.total_steps == 3
    assert lrs == pytest.approx([2e-5, 2e-5 * 0.8125, 2e-5 * 0.4375, 5e-6, 5e-6, 5e-6])  # never warms back up
    resumed = OfflineCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5), str(tmp_path), 512)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.get_last_lr() == schedule.get_last_lr()
    assert OfflineCosine(optimizer, str(tmp_path), 512, epochs=2).total_steps == 6
    empty = OfflineCosine(optimizer, str(tmp_path / "empty"), 512)  # a config is built before the offline pass
    with pytest.raises(ValueError, match=r"path='.*empty' holds no rank\*.jsonl: run SOPHIA's offline pass first"):
        empty.step()  # the first step counts the rows
