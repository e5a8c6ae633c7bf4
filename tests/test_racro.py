"""RACRO on CPU: caption prompts, the caption reward, caption-only gradients, fit, test and a swapped reasoner.

Reasoners here are real: the tiny random Qwen2 (``HFReasoner``) and ``OpenAIReasoner`` talking HTTP to
``tests/openai_server.py``, a real loopback server whose answers are canned (it boxes the word after
``ANSWER=`` in the prompt, a fixed word, or a word chosen by the prompt's length parity), so the
reasoner's accuracy, and therefore the reward, is known in advance.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.openai_server import ServerProcess
from tests.test_grpo import make_data, quiet_trainer
from vlrl.cli import main
from vlrl.data import RLDataModule, Synthetic
from vlrl.data.prompts import collate_prompts
from vlrl.methods import RACRO
from vlrl.methods.base import RLMethod
from vlrl.models import Policy
from vlrl.rewards import CaptionReward, HFReasoner, OpenAIReasoner, is_correct
from vlrl.rollout import Sampling
from vlrl.types import PromptBatch

pytestmark = pytest.mark.timeout(300)

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "racro.yaml")
KEY_ENV, KEY = "VLRL_TEST_REASONER_KEY", "sk-test-secret-456"
SERVED_ANSWER = "<think>From the caption.</think> The answer is \\boxed{{{}}}."
TEMPLATE = "{question}\nAnswer in \\boxed{{}}."  # the prompt template of make_data()


def make_racro(reasoner, **overrides) -> RACRO:
    kwargs = dict(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"),
        caption_reward=CaptionReward(
            reasoner,
            sampling=Sampling(temperature=1.0, max_new_tokens=8),
            eval_sampling=Sampling(temperature=0.0, max_new_tokens=8),
        ),
        sampling=Sampling(temperature=1.0, max_new_tokens=8),
        group_size=4,
        micro_batch_size=8,
        kl_coef=0.001,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        seed=5,
    )
    kwargs.update(overrides)
    return RACRO(**kwargs)


def http_reasoner(server: ServerProcess, **kwargs) -> OpenAIReasoner:
    return OpenAIReasoner(server.base_url, "served", api_key_env=KEY_ENV, timeout_s=30, max_retries=0, **kwargs)


def rows_batch(split: str, count: int) -> PromptBatch:
    data = (
        make_data() if split == "train" else RLDataModule(test=Synthetic("test", size=count), prompt_template=TEMPLATE)
    )
    dataset = data.dataset(split)
    return collate_prompts([dataset[i] for i in range(count)])


def user_text(request: dict) -> str:
    """The user turn of a request the test server received."""
    return request["body"]["messages"][-1]["content"]


def user_texts(server: ServerProcess) -> list[str]:
    return [user_text(r) for r in server.log()["requests"]]


# ------------------------------------------------------------------------------- prompts


def test_caption_prompt_is_built_from_the_raw_question():
    module = make_racro(HFReasoner("tiny:qwen2"))  # nothing is loaded by the constructor
    image = Image.new("RGB", (56, 56), "white")
    batch = PromptBatch(
        ids=["a", "b"],
        messages=[[{"role": "user", "content": "templated"}]] * 2,
        images=[[image], [image, image]],
        answers=["red", "A"],
        choices=[None, ["the red one", "the blue one"]],
        data_sources=["color", "compare"],
        questions=["What colour is the shape? <image1>", "Which shape is bigger?"],
    )
    captions = module.caption_batch(batch)
    system = {
        "role": "system",
        "content": [
            {
                "type": "text",
                "text": "You are given an image and a relevant question. Based on the query, please describe the "
                "image in detail. Do not try to answer the question.",
            }
        ],
    }
    tail = "\nPlease describe the image. DO NOT try to answer the question!"
    assert captions.messages[0] == [
        system,
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"Question: What colour is the shape?{tail}"}],
        },
    ]
    assert captions.messages[1][1]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": f"Question: Which shape is bigger?\nA. the red one\nB. the blue one{tail}"},
    ]
    assert captions.answers == batch.answers and captions.questions == batch.questions
    with pytest.raises(ValueError, match="PromptBatch.questions, which has 0 entries for 2 prompts"):
        module.caption_batch(replace(batch, questions=[]))


def test_templates_are_validated_at_construction():
    with pytest.raises(ValueError, match=r"caption_prompt='Describe the image.' lacks the field\(s\) \['question'\]"):
        make_racro(HFReasoner("tiny:qwen2"), caption_prompt="Describe the image.")
    with pytest.raises(ValueError, match=r"prompt='\{question\} \{answer\}' uses unknown field\(s\) \['answer'\]"):
        CaptionReward(HFReasoner("tiny:qwen2"), prompt="{question} {answer}")
    with pytest.raises(ValueError, match=r"samples_per_caption=0 must be >= 1"):
        CaptionReward(HFReasoner("tiny:qwen2"), samples_per_caption=0)


def test_joint_prompt_shows_the_tentative_answer():
    reward = CaptionReward(HFReasoner("tiny:qwen2"), system_prompt=None)
    (plain,) = reward.build_prompts([" A red square. "], ["What colour?"], [None])
    (joint,) = reward.build_prompts(["A red square."], ["What colour?"], [None], tentative=["It is \\boxed{blue}. "])
    assert plain == [
        {
            "role": "user",
            "content": "### The detailed caption of the provided image: A red square.\n\n### Question: What colour? "
            "Please think step by step. The final answer MUST BE put in \\boxed{}.",
        }
    ]
    assert joint[0]["content"] == (
        "### The detailed caption of the provided image: A red square.\n\n"
        "### A tentative answer by a model that saw the image (it may be wrong; if it is, override it): "
        "It is \\boxed{blue}.\n\n### Question: What colour? Please think step by step. "
        "The final answer MUST BE put in \\boxed{}."
    )


# ---------------------------------------------------------------------------- the reward


def test_reward_equals_the_reasoners_graded_accuracy_on_constructed_captions():
    """k=2 answers per caption, answered in order: the server boxes the word after ANSWER= in the caption;
    its 4th answer (caption 1, second sample) is marked truncated and must score 0 although it is right."""
    captions = [
        "A red square. ANSWER=red",
        "A red square. ANSWER=red",
        "A blue circle. ANSWER=blue",
        "Half is shaded. ANSWER=\\frac{1}{2}",
        "Two shapes. ANSWER=B",
    ]
    questions = ["What colour is the shape?"] * 3 + ["What fraction is shaded?", "Which shape is bigger?"]
    answers = ["red", "red", "red", "0.5", "B"]
    choices = [None, None, None, None, ["the red one", "the blue one"]]
    with ServerProcess(actions=["ok", "ok", "ok", "truncated"]) as server:
        reward = CaptionReward(http_reasoner(server, max_concurrency=1, max_n=1), samples_per_caption=2)  # per answer
        scores = reward(captions, questions, answers, choices, seed=0)
        log = server.log()
    assert scores.correct.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert scores.accuracy.tolist() == [1.0, 0.5, 0.0, 1.0, 1.0]
    stats = scores.stats
    assert stats["reasoner/accuracy"] == pytest.approx(0.7)
    assert stats["reasoner/truncated_frac"] == pytest.approx(0.1)
    assert stats["reasoner/response_length"] == 7.0  # the server counts 7 words per answer
    assert stats["reasoner/latency_s"] > 0
    requests = log["requests"]
    assert len(requests) == 10  # all captions x k in one batched call
    assert requests[0]["body"]["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": "### The detailed caption of the provided image: A red square. ANSWER=red\n\n"
            "### Question: What colour is the shape? Please think step by step. "
            "The final answer MUST BE put in \\boxed{}.",
        },
    ]
    assert "### Question: Which shape is bigger?\nA. the red one\nB. the blue one Please think" in user_text(
        requests[8]
    )
    assert [r["body"]["temperature"] for r in requests] == [1.0] * 10
    assert [r["body"]["max_tokens"] for r in requests] == [8192] * 10


def test_step_reward_is_the_reasoners_accuracy_on_the_sampled_captions():
    """Real captions of the tiny VLM; the server answers 7 when the reasoner prompt has an even length, else 0."""
    with ServerProcess(parity="7,0") as server:
        module = make_racro(http_reasoner(server))
        module.configure_model()
        batch = replace(rows_batch("train", 2), answers=["7", "7"])
        rollout = module.score(module.generate(batch, module.sampling, module.group_size))
        received = sorted(user_texts(server))
    idx = rollout.group_index.tolist()
    prompts = module.caption_reward.build_prompts(
        rollout.texts, [batch.questions[i] for i in idx], [batch.choices[i] for i in idx]
    )
    users = [p[-1]["content"] for p in prompts]
    expected = [1.0 if len(u) % 2 == 0 else 0.0 for u in users]
    assert 0 < sum(expected) < len(expected), "the parity rule should give mixed rewards for this seed"
    assert rollout.rewards.tolist() == expected
    assert rollout.reward_components["reasoner_accuracy"].tolist() == expected
    assert received == sorted(users)  # every caption reached the reasoner, inside the reasoner prompt
    answers = [texts[0] for texts in rollout.facts["reasoner_texts"]]  # k = 1 answer per caption
    assert all(a.endswith("\\boxed{7}." if e else "\\boxed{0}.") for a, e in zip(answers, expected, strict=True))
    assert "Please describe the image. DO NOT try to answer the question!" in str(rollout.batch.messages[0])
    assert rollout.stats["caption/length"] == rollout.response_mask.sum(1).mean().item()
    assert rollout.stats["reasoner/accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert set(rollout.stats) >= {"reasoner/response_length", "reasoner/latency_s", "reasoner/truncated_frac"}


# ------------------------------------------------------------------------------ training


def test_gradients_flow_only_through_caption_tokens():
    """Backward of the RACRO loss reaches the logits that predict caption tokens, and nothing else."""
    module = make_racro(HFReasoner("tiny:qwen2", dtype="float32"))
    module.prompt_once = False  # one forward over [N, P + T], the layout this test reads at the lm_head
    module.configure_model()
    module.caption_reward.setup(module.device)
    rollout = module.score(module.generate(rows_batch("train", 2), module.sampling, module.group_size))
    rollout.advantages = torch.linspace(-1.0, 1.0, len(rollout))  # [N] all non-zero
    module.prepare_update(rollout)  # reference log-probs for the k3 KL term
    captured = []

    def keep(_module, _inputs, logits):
        logits.retain_grad()
        captured.append(logits)

    handle = module.model.lm_head.register_forward_hook(keep)
    try:
        logprobs, entropy = module.policy_logprobs(module.model, rollout, with_entropy=True)
        loss, _ = module.loss(rollout, logprobs, entropy, rollout.train_mask.sum(), len(rollout))
        loss.backward()
    finally:
        handle.remove()
    grad = captured[0].grad.abs().sum(dim=-1)  # [N, P + T] gradient reaching each position's logits
    width = rollout.response_ids.shape[1]
    prompt_width = grad.shape[1] - width
    trained = torch.zeros_like(grad)
    trained[:, prompt_width - 1 : prompt_width - 1 + width] = rollout.response_mask  # position p predicts p + 1
    assert bool((grad[trained == 0] == 0).all()), "a prompt or padding position received gradient"
    assert bool((grad[trained == 1] > 0).all()), "a caption token received no gradient"
    reasoner = module.caption_reward.reasoner.model
    assert all(p.grad is None and not p.requires_grad for p in reasoner.parameters())


def test_fit_trains_the_captioner_and_keeps_the_reasoner_out_of_the_checkpoint(tmp_path):
    module = make_racro(HFReasoner("tiny:qwen2", dtype="float32"))
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    metrics = trainer.callback_metrics
    for key in (
        "reasoner/accuracy",
        "reasoner/response_length",
        "reasoner/latency_s",
        "caption/length",
        "reward/reasoner_accuracy",
        "update/kl_ref",
    ):
        assert key in metrics, key
    assert 0 < metrics["caption/length"] <= 8 and 0 < metrics["reasoner/response_length"] <= 8
    reasoner = module.caption_reward.reasoner.model
    assert next(reasoner.parameters()).device == module.device
    assert all(not p.requires_grad for p in reasoner.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    trainer.save_checkpoint(tmp_path / "racro.ckpt")
    checkpoint = torch.load(tmp_path / "racro.ckpt", weights_only=False)
    assert checkpoint["state_dict"].keys() == module.state_dict().keys()
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) == sum(
        p.numel() for p in module.model.parameters()
    )


def test_test_reports_accuracy_per_source_with_the_joint_check(monkeypatch, tmp_path):
    """Evaluation: caption -> reasoner -> grade; the joint check adds the captioner's own greedy answer."""
    batch = rows_batch("test", 8)
    with ServerProcess(answer="red") as server:
        module = make_racro(http_reasoner(server), joint_check=True, kl_coef=0.0)
        data = RLDataModule(test=Synthetic("test", size=8), eval_batch_size=8, prompt_template=TEMPLATE)
        trainer = quiet_trainer(default_root_dir=tmp_path)
        trainer.test(module, datamodule=data)
        received = sorted(user_texts(server))
    metrics = trainer.callback_metrics
    graded = [is_correct(SERVED_ANSWER.format("red"), a, c) for a, c in zip(batch.answers, batch.choices, strict=True)]
    assert metrics["test/accuracy"].item() == pytest.approx(sum(graded) / len(graded))
    for source in set(batch.data_sources):
        mine = [g for g, s in zip(graded, batch.data_sources, strict=True) if s == source]
        assert metrics[f"test/accuracy/{source}"].item() == pytest.approx(sum(mine) / len(mine))
    assert "test/caption_length" in metrics and "test/reasoner_latency_s" in metrics
    captions = module.generate(batch, module.eval_sampling, 1).texts
    tentative = RLMethod.generate(module, batch, module.eval_sampling, 1).texts  # the datamodule's own prompt
    prompts = module.caption_reward.build_prompts(captions, batch.questions, batch.choices, tentative)
    assert received == sorted(p[-1]["content"] for p in prompts)
    assert all("### A tentative answer by a model that saw the image" in text for text in received)
    # the predictions file: the reasoner's answer as the response, the caption and the tentative answer beside it
    written = {r["id"]: r for r in map(json.loads, (tmp_path / "eval" / "test-step0" / "predictions.jsonl").open())}
    for i, row_id in enumerate(batch.ids):
        assert written[row_id]["response"] == SERVED_ANSWER.format("red")
        assert written[row_id]["details"] == {"caption": captions[i], "tentative": tentative[i]}


# ----------------------------------------------------------------------------------- CLI


def test_cli_fit_then_test_with_a_served_reasoner_swapped_in_by_config(tmp_path, monkeypatch):
    """Plug-and-play: train with the HF reasoner, test the checkpoint with an HTTP one; the key is never saved."""
    monkeypatch.setenv(KEY_ENV, KEY)
    trainer = {
        "max_steps": 2,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path), "name": "logs"},
        },
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
            }
        ],
    }
    data = {"init_args": {"test": {"class_path": "vlrl.data.Synthetic", "init_args": {"split": "test", "size": 8}}}}
    fit_overlay = tmp_path / "fit.yaml"
    fit_overlay.write_text(yaml.safe_dump({"trainer": trainer, "data": data}))
    main(["fit", "--config", DEMO, "--config", str(fit_overlay)])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    with ServerProcess(answer="red") as server:
        reasoner = {
            "class_path": "vlrl.rewards.OpenAIReasoner",
            "init_args": {"base_url": server.base_url, "model": "served", "api_key_env": KEY_ENV, "timeout_s": 30},
        }
        test_overlay = tmp_path / "test.yaml"
        model = {"init_args": {"caption_reward": {"init_args": {"reasoner": reasoner}}}}
        test_overlay.write_text(yaml.safe_dump({"trainer": trainer, "data": data, "model": model}))
        main(
            [
                "test",
                "--config",
                DEMO,
                "--config",
                str(test_overlay),
                "--ckpt_path",
                str(tmp_path / "ckpt" / "last.ckpt"),
            ]
        )
        requests = server.log()["requests"]
    assert len(requests) == 8 and all(r["authorization"] == f"Bearer {KEY}" for r in requests)
    batch = rows_batch("test", 8)
    graded = [is_correct(SERVED_ANSWER.format("red"), a, c) for a, c in zip(batch.answers, batch.choices, strict=True)]
    test_rows = [
        row
        for path in tmp_path.glob("logs/version_*/metrics.csv")
        for row in csv.DictReader(path.read_text().splitlines())
    ]
    accuracy = [float(row["test/accuracy"]) for row in test_rows if row.get("test/accuracy")]
    assert accuracy == [pytest.approx(sum(graded) / len(graded))]
    saved = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" and "OpenAIReasoner" in p.read_text() for p in saved)
    assert not [p for p in saved if KEY.encode() in p.read_bytes()], "the API key was written to disk"
