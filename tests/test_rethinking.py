"""ForcedRethinking: eligibility, cut rules, trigger choice, continuation on the tiny VLM, keep rules, log-probs."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from tests.test_grpo import make_data, make_module
from tests.test_ppo import make_ppo, make_trainer
from vlrl.callbacks import ForcedRethinking, RLCallback
from vlrl.callbacks.rethinking import RethinkPlan, Rethought, cut_position, tokens_before
from vlrl.models.inputs import encode_prompt
from vlrl.rewards import AccuracyReward, InvalidResponsePenalty, NativeWaitBonus
from vlrl.rollout import Generation
from vlrl.types import Rollout

MARKERS = ["Wait", "\\boxed", "\n\n"]


@pytest.fixture(scope="module")
def module():
    module = make_module()
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def batch():
    data = make_data(batch_size=2)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def constructed_rollout(module, batch, texts: list[str], finishes: list[str]) -> Rollout:
    """A rollout whose responses are the token ids of ``texts`` (+ EOS where finished), prompts of ``batch``."""
    tok = module.tokenizer
    group = len(texts) // len(batch)
    encoded = [encode_prompt(module.processor, m, i) for m, i in zip(batch.messages, batch.images, strict=True)]
    ids = [
        tok.encode(t, add_special_tokens=False) + ([tok.eos_token_id] if f == "stop" else [])
        for t, f in zip(texts, finishes, strict=True)
    ]
    width = max(len(i) for i in ids)
    response = torch.full((len(ids), width), module.pad_id)
    mask = torch.zeros(len(ids), width)
    for j, row in enumerate(ids):
        response[j, : len(row)], mask[j, : len(row)] = torch.tensor(row), 1.0
    logprobs = -(torch.arange(width).float() + 1).repeat(len(ids), 1) / 10 * mask  # distinct per position
    return Rollout(
        prompts=[p for p in encoded for _ in range(group)],
        response_ids=response,
        response_mask=mask,
        logprobs=logprobs,
        texts=list(texts),
        finish_reasons=list(finishes),
        group_index=torch.arange(len(batch)).repeat_interleave(group),
        batch=batch,
    )


# ------------------------------------------------------------------------------ pure pieces
def test_cut_position_follows_the_rule_order():
    assert cut_position("a = 2. Wait, a = 3 \\boxed{3}\n\nDone", MARKERS) == 7  # last "Wait"
    assert cut_position("Wait. a = 2. Wait, a = 3", MARKERS) == 13  # the last of several
    assert cut_position("a = 3\n\nso \\boxed{3}", MARKERS) == 10  # no Wait: last \boxed
    assert cut_position("a = 3\n\nb = 4\n\nc", MARKERS) == 12  # neither: last paragraph break
    assert cut_position("a = 3, b = 4", MARKERS) is None  # nothing: the trigger follows the whole response
    assert cut_position("Wait, a = 3", MARKERS) is None  # a cut at 0 would keep nothing


def test_tokens_before_keeps_whole_tokens_up_to_the_cut(module):
    tok = module.tokenizer
    text = "x = 12 + 30 = 42. Wait, let me check: \\boxed{42}"
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    for cut in (0, 5, text.index("Wait"), text.index("\\boxed"), len(text)):
        k = tokens_before(tok, ids, cut)
        kept = tok.decode(ids[:k])
        assert len(kept) <= cut and text.startswith(kept)
        assert k == len(ids) or len(tok.decode(ids[: k + 1])) > cut  # the next token would cross the cut


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("x = 2. Wait, x = 3. \\boxed{3}", "x = 2. "),
        ("x = 3.\n\nSo \\boxed{3}", "x = 3.\n\nSo "),
        ("x = 3.\n\nSo x is 3", "x = 3."),
        ("x is 3", "x is 3"),
    ],
)
def test_each_cut_rule_on_a_constructed_response(module, batch, text, kept):
    rollout = constructed_rollout(module, batch, [text] * 8, ["stop"] * 8)
    callback = ForcedRethinking(truncate_prob=1.0)
    plan = callback.plan(rollout, 0, False, module.tokenizer, random.Random(0), limit=100)
    prefix = module.tokenizer.decode(plan.prefix_ids)
    assert kept.startswith(prefix) and len(kept) - len(prefix) <= 1  # a cut inside a token keeps less
    assert module.tokenizer.eos_token_id not in plan.prefix_ids.tolist()
    assert torch.equal(plan.prefix_logprobs, rollout.logprobs[0, : len(plan.prefix_ids)])
    whole = ForcedRethinking(truncate_prob=0.0).plan(rollout, 0, False, module.tokenizer, random.Random(0), limit=100)
    assert module.tokenizer.decode(whole.prefix_ids) == text  # no cut: all but the EOS
    assert whole.cap == min(1024, 100 - len(whole.prefix_ids) - len(whole.trigger_ids))


def test_trigger_choice():
    rng = random.Random(0)
    specific = ForcedRethinking(generic_prob=0.0)
    assert specific.choose_trigger(True, rng) == "\n\nWait, let's double check"
    assert specific.choose_trigger(False, rng) == "\n\nWait, there might be a mistake"
    generic = ForcedRethinking(generic_prob=1.0)
    draws = [generic.choose_trigger(True, rng) for _ in range(4000)]
    assert set(draws) == {"\n\nWait", "\n\nWait, does it seem right?"}
    assert draws.count("\n\nWait") / len(draws) == pytest.approx(0.4, abs=0.03)  # weights 0.4 / 0.6
    half = ForcedRethinking(generic_prob=0.5, triggers={"\n\nHmm": 1.0})
    draws = [half.choose_trigger(False, rng) for _ in range(4000)]
    assert draws.count("\n\nHmm") / len(draws) == pytest.approx(0.5, abs=0.03)
    assert set(draws) == {"\n\nHmm", "\n\nWait, there might be a mistake"}


def test_eligibility(module, batch):
    # batch answers: two prompts; group 0 gets 3 correct of 4 (accuracy 0.75 > 0.7), group 1 gets 1 of 4
    right0, right1 = f"\\boxed{{{batch.answers[0]}}}", f"\\boxed{{{batch.answers[1]}}}"
    texts = [right0, right0, right0, "\\boxed{nothing}", right1, "\\boxed{nothing}", right1 + " " * 30, right1]
    finishes = ["stop"] * 7 + ["length"]
    rollout = constructed_rollout(module, batch, texts, finishes)
    callback = ForcedRethinking(min_room=20)
    correct = callback.grade(module, rollout)
    assert correct == [True, True, True, False, True, False, True, False]  # truncated is not correct
    lengths = rollout.response_mask.sum(1).long().tolist()
    limit = lengths[6] + 19  # sample 6 (padded with spaces) has 19 tokens of room, the others more
    assert all(limit - n >= 20 for j, n in enumerate(lengths) if j != 6)
    eligible = callback.eligible(rollout, correct, limit)
    # wrong in an accurate group (3), too little room (6), truncated (7) are not eligible
    assert eligible == [True, True, True, False, True, True, False, False]
    loose = ForcedRethinking(min_room=20, skip_wrong_above_accuracy=1.0, require_eos=False)
    assert loose.eligible(rollout, correct, limit) == [True, True, True, True, True, True, False, True]


def vl_rethinker_rewards() -> list:
    """configs/vl_rethinker.yaml's rewards, with the optional native-wait bonus."""
    return [AccuracyReward(boxed_only=True), InvalidResponsePenalty(boxed_only=True), NativeWaitBonus(weight=0.1)]


def test_correct_is_what_the_module_rewards_call_correct(module, batch):
    """Group accuracy and eligibility follow the rewards: 6 "wait"s or no \\boxed{} is wrong for VL-Rethinker."""
    a0, a1 = batch.answers
    texts = [f"\\boxed{{{a0}}}"] * 3 + ["wait " * 6 + f"\\boxed{{{a0}}}"]
    texts += [f"So the answer is {a1}.", f"So the answer is {a1}.", f"\\boxed{{{a1}}}", f"\\boxed{{{a1}}}"]
    rollout = constructed_rollout(module, batch, texts, ["stop"] * 8)
    callback = ForcedRethinking(min_room=0)
    rewards, module.rewards = module.rewards, [NativeWaitBonus()]  # no reward that defines correct: is_correct
    try:
        assert callback.grade(module, rollout) == [True] * 8
        module.rewards = vl_rethinker_rewards()
        correct = callback.grade(module, rollout)
    finally:
        module.rewards = rewards
    assert correct == [True, True, True, False, False, False, True, True]
    # group 0 is 3/4 = 0.75 accurate: its wrong (six-wait) response is not eligible; group 1 is at 0.5
    assert callback.eligible(rollout, correct, limit=1000) == [True, True, True, False, True, True, True, True]


def test_a_kept_rethought_sample_is_correct_by_the_reward(module, batch):
    """keep_only_correct under VL-Rethinker's reward: a continuation with six "wait"s or an unboxed answer is
    not kept, and every kept sample scores as correct (never the -0.1 of an invalid response)."""
    rollout = module.generate(batch, module.sampling, module.group_size)
    a0 = batch.answers[0]
    continuations = [f" so \\boxed{{{a0}}}", " wait" * 6 + f" so \\boxed{{{a0}}}", f" so the answer is {a0}."]
    callback = ForcedRethinking(
        fraction=1.0, min_room=0, max_response_tokens=60, min_continuation_tokens=0, require_eos=False, seed=1
    )
    engine, module.rollout_engine = module.rollout_engine, ScriptedEngine(module.tokenizer, continuations)
    rewards, module.rewards = module.rewards, vl_rethinker_rewards()
    try:
        out = callback.on_rollout_end(None, module, rollout)
        scored = module.score(out)
    finally:
        module.rollout_engine, module.rewards = engine, rewards
    assert batch.answers[0] != batch.answers[1]
    # sample j continues with continuations[j % 3]: in group 0 (samples 0-3) samples 0 and 3 are boxed and right;
    # is_correct alone would also keep 1 (six waits) and 2 (the phrase), and keep 0 and 1 as the first two
    assert out.facts["rethought"] == [True, False, False, True, False, False, False, False]
    assert out.stats["rethink/correct"] == 2 == out.stats["rethink/kept"]
    assert scored.rewards[[0, 3]].tolist() == pytest.approx([1.0, 1.0])  # the trigger's "Wait" is not native


def test_keep_only_correct_and_at_most_n_per_prompt(module, batch):
    rollout = constructed_rollout(module, batch, ["a"] * 8, ["stop"] * 8)
    plan = RethinkPlan(0, torch.tensor([1]), torch.tensor([-0.1]), "\n\nWait", torch.tensor([2]), cap=4)
    results = [  # (sample, correct): group 0 = samples 0-3, group 1 = samples 4-7
        Rethought(replace(plan, index=i), torch.tensor([1, 2]), torch.tensor([-0.1, -0.2]), "t", 1, "stop", c)
        for i, c in [(0, True), (1, False), (2, True), (3, True), (5, False), (6, True)]
    ]
    kept = ForcedRethinking(max_per_prompt=2).keep(rollout, results)
    assert [r.plan.index for r in kept] == [0, 2, 6]  # wrong ones dropped, the third correct of group 0 too
    kept_all = ForcedRethinking(max_per_prompt=2, keep_only_correct=False).keep(rollout, results)
    assert [r.plan.index for r in kept_all] == [0, 1, 5, 6]


# ------------------------------------------------------------------------- on the tiny VLM
def rethink(module, batch, **kwargs) -> tuple[Rollout, Rollout]:
    rollout = module.generate(batch, module.sampling, module.group_size)  # 2 prompts x 4 samples, 8 tokens
    settings = dict(
        fraction=1.0,
        min_room=0,
        max_response_tokens=module.max_new_tokens + 14,
        min_continuation_tokens=2,
        max_continuation_tokens=6,
        keep_only_correct=False,
        require_eos=False,  # a random policy rarely stops
        seed=3,
    )
    callback = ForcedRethinking(**{**settings, **kwargs})
    return rollout, callback.on_rollout_end(None, module, rollout)


def test_rethought_samples_have_trigger_and_finite_behaviour_logprobs(module, batch):
    original, out = rethink(module, batch)
    tok = module.tokenizer
    rethought = out.facts["rethought"]
    assert sum(rethought) == 4 == out.stats["rethink/kept"]  # 2 per prompt
    assert out.stats["rethink/selected"] == 8 and out.stats["rethink/eligible"] == 8
    assert out.loss_mask is None
    assert [sum(rethought[g * 4 : g * 4 + 4]) for g in range(2)] == [2, 2]
    with torch.no_grad():
        recomputed, _ = module.policy_logprobs(module.model, out)  # [N, W]
    for i in range(len(out)):
        mask = out.response_mask[i].bool()
        assert torch.isfinite(out.logprobs[i]).all() and (out.logprobs[i][~mask] == 0).all()
        if not rethought[i]:
            assert out.texts[i] == original.texts[i]
            continue
        trigger, at = out.facts["rethink_trigger"][i], out.facts["rethink_trigger_at"][i]
        assert out.texts[i][at : at + len(trigger)] == trigger
        assert out.facts["rethink_original"][i] == original.texts[i]
        trigger_ids = tok.encode(trigger, add_special_tokens=False)
        ids = out.response_ids[i][mask].tolist()
        k = next(k for k in range(len(ids)) if ids[k : k + len(trigger_ids)] == trigger_ids)  # where it sits
        assert ids[:k] == original.response_ids[i, :k].tolist()  # the kept prefix is the sampled one
        assert torch.equal(out.logprobs[i, :k], original.logprobs[i, :k])  # with its sampled log-probs
        span = slice(k, k + len(trigger_ids))
        assert (out.logprobs[i, span] < 0).all()  # present: the trigger was never sampled
        n = int(mask.sum())
        torch.testing.assert_close(out.logprobs[i, k:n], recomputed[i, k:n], atol=1e-4, rtol=0)
        assert n <= module.max_new_tokens + 14  # within max_response_tokens


def test_mask_trigger_leaves_trigger_tokens_out_of_the_loss(module, batch):
    _, plain = rethink(module, batch)
    _, masked = rethink(module, batch, mask_trigger=True)
    assert torch.equal(plain.response_ids, masked.response_ids)  # same draws, same samples
    assert plain.train_mask is plain.response_mask and masked.loss_mask is not None
    dropped = masked.response_mask - masked.loss_mask  # [N, W] 1 exactly on trigger tokens
    tok = module.tokenizer
    for i, trigger in enumerate(masked.facts["rethink_trigger"]):
        ids = masked.response_ids[i][dropped[i].bool()].tolist()
        assert ids == (tok.encode(trigger, add_special_tokens=False) if trigger else [])
    assert (dropped >= 0).all() and dropped.sum() > 0


class ScriptedEngine:
    """Continuations with given texts. A random tiny policy never answers right, so keep-only-correct
    needs known-correct continuations: this engine stands in for a policy that writes them (the log-probs
    of the kept samples are still the tiny policy's, recomputed by the callback)."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, prompts, sampling, seed=None) -> Generation:
        rows = [self.tokenizer.encode(t, add_special_tokens=False) + [self.tokenizer.eos_token_id] for t in self.texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id)
        mask = torch.zeros(len(prompts), width)
        for j in range(len(prompts)):
            row = rows[j % len(rows)]
            ids[j, : len(row)], mask[j, : len(row)] = torch.tensor(row), 1.0
        return Generation(ids, mask, -mask, ["stop"] * len(prompts))


def test_keep_only_correct_keeps_correct_continuations_only(module, batch):
    rollout = module.generate(batch, module.sampling, module.group_size)
    tok = module.tokenizer
    answers = [batch.answers[int(g)] for g in rollout.group_index]
    continuations = [f" so \\boxed{{{answers[0]}}}", " so \\boxed{nothing}"]  # sample j gets j % 2
    callback = ForcedRethinking(
        fraction=1.0, min_room=0, max_response_tokens=40, min_continuation_tokens=0, require_eos=False, seed=1
    )
    engine, module.rollout_engine = module.rollout_engine, ScriptedEngine(tok, continuations)
    try:
        out = callback.on_rollout_end(None, module, rollout)
    finally:
        module.rollout_engine = engine
    correct_in_group0 = 2  # samples 0 and 2 of group 0 answer group 0's question; group 1's answer differs
    assert batch.answers[0] != batch.answers[1]
    assert out.stats["rethink/correct"] == correct_in_group0 == out.stats["rethink/kept"]
    assert out.facts["rethought"] == [True, False, True, False, False, False, False, False]
    for i in (0, 2):
        assert out.texts[i].endswith(f"so \\boxed{{{answers[0]}}}") and out.finish_reasons[i] == "stop"
        assert (
            torch.isfinite(out.logprobs[i]).all()
            and out.response_ids[i][out.response_mask[i].bool()][-1] == tok.eos_token_id
        )


class ValuesSeen(RLCallback):
    """Keeps the rollout as the advantage hook sees it (after rewards, critic values and advantages)."""

    def __init__(self) -> None:
        self.rollout: Rollout | None = None

    def on_advantages_computed(self, trainer, pl_module, rollout):
        self.rollout = rollout
        return rollout


def test_ppo_critic_values_cover_the_rethought_responses(tmp_path):
    """With a critic, values are computed after on_rollout_end, so they are the rethought responses' own."""
    seen = ValuesSeen()
    rethinking = ForcedRethinking(
        fraction=1.0,
        min_room=0,
        max_response_tokens=20,
        min_continuation_tokens=2,
        max_continuation_tokens=6,
        keep_only_correct=False,
        require_eos=False,
        seed=3,
    )
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[rethinking, seen])
    trainer.fit(make_ppo(), datamodule=make_data(batch_size=2))
    out = seen.rollout
    assert sum(out.facts["rethought"]) == 4  # 2 of each prompt's 4 samples
    width = out.response_ids.shape[1]
    assert width > 8  # wider than the first generation (8 tokens): the rethought responses are longer
    assert out.values.shape == out.advantages.shape == (8, width)
    for i in range(8):
        n = int(out.response_mask[i].sum())
        assert (out.values[i, n:] == 0).all() and torch.isfinite(out.values[i, :n]).all()
        assert (out.advantages[i, :n] != 0).any()  # advantages on every response token, the rethought ones too


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(fraction=1.5), "fraction=1.5 must be a probability"),
        (dict(min_continuation_tokens=50, max_continuation_tokens=10), "min_continuation_tokens=50 is above"),
        (dict(triggers={}), "at least one trigger"),
        (dict(triggers={"\n\nWait": -1.0}), "positive weight"),
        (dict(cut_markers=[""]), "cut_markers holds an empty string"),
        (dict(max_per_prompt=0), "max_per_prompt=0 must be >= 1"),
        (dict(max_continuation_tokens=0), "max_continuation_tokens=0 must be >= 1"),
        (dict(max_response_tokens=0), "max_response_tokens=0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForcedRethinking(**kwargs)
