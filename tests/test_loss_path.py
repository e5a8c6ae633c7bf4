"""The one policy-loss path: ``policy_objective`` on a padded batch worked by hand, with importance weights,
a KL to a reference and an entropy bonus together; GRPO's and PPO's ``loss`` give exactly its numbers.
Also the small helpers every engine, reasoner and method shares (pad and stop ids, decoding, no-gradient
micro-batch maps)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import partial

import pytest
import torch

from tests.test_grpo import make_module
from tests.test_ppo import hand_rollout, make_ppo
from vlrl.algorithms import PolicyLossOutput, policy_loss, policy_objective
from vlrl.models import Policy
from vlrl.models.inputs import cut_at_stop, map_micro_batches
from vlrl.models.loading import decode_responses, pad_token_id, stop_token_ids

LN2 = math.log(2.0)

# Two right-padded responses of 2 and 1 trained tokens; every padded position holds garbage that must not count.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
LOGPROBS = torch.tensor([[math.log(0.6), math.log(0.5), -30.0], [math.log(0.3), -30.0, -30.0]])
OLD = torch.tensor([[math.log(0.4), math.log(0.5), 0.0], [math.log(0.6), 0.0, 0.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])  # one per sequence
IS_WEIGHTS = torch.tensor([[0.5, 2.0, 7.0], [1.5, 7.0, 7.0]])
# log π − log π_ref = −ln 2, 0, ln 2 on the three trained tokens (−5 on padding)
REF = LOGPROBS + torch.tensor([[LN2, 0.0, 5.0], [-LN2, 5.0, 5.0]])
ENTROPY = torch.tensor([[1.0, 2.0, 9.0], [0.5, 9.0, 9.0]])
KL_COEF, ENTROPY_COEF = 0.1, 0.01

# Worked by hand, clip range [0.8, 1.2]:
#   token a: ρ = 0.6/0.4 = 1.5, A = 1:  max(−1.5, −1.2) = −1.2 (clipped), × w 0.5 = −0.6
#   token b: ρ = 1,             A = 1:  −1                            × w 2   = −2
#   token c: ρ = 0.3/0.6 = 0.5, A = −2: max(1.0, 1.6) = 1.6 (clipped), × w 1.5 = 2.4
# k3 = e^{−d} + d − 1 with d = log π − log π_ref: a (d = −ln 2) 1 − ln 2, b 0, c (d = ln 2) ln 2 − 0.5; sum 0.5.
POLICY = [-0.6, -2.0, 2.4]
K3 = [1 - LN2, 0.0, LN2 - 0.5]
H = [1.0, 2.0, 0.5]
TOTAL = [p + KL_COEF * k - ENTROPY_COEF * h for p, k, h in zip(POLICY, K3, H, strict=True)]  # per token
# sum: −0.2 + 0.1·0.5 − 0.01·3.5 = −0.185
HAND_LOSS = {
    "token-mean": sum(TOTAL) / 3,
    "seq-mean-token-mean": ((TOTAL[0] + TOTAL[1]) / 2 + TOTAL[2]) / 2,
    "seq-mean-token-sum": sum(TOTAL) / 2,
    "seq-mean-token-sum-norm": sum(TOTAL) / 4 / 2,  # max_len 4
}
HAND_METRICS = {
    "update/policy_loss": -0.2 / 3,
    "update/clip_frac": 2 / 3,
    "update/dual_clip_frac": 0.0,
    "update/ratio_mean": (1.5 + 1.0 + 0.5) / 3,
    "update/approx_kl": math.log(4 / 3) / 3,  # (0.5 − ln 1.5) + 0 + (−0.5 + ln 2), over 3 tokens
    "update/kl_ref": 0.5 / 3,
    "update/entropy": 3.5 / 3,
}


def composed(**overrides):
    logprobs = LOGPROBS.clone().requires_grad_(True)
    entropy = ENTROPY.clone().requires_grad_(True)
    kwargs = dict(
        policy_term=partial(policy_loss, eps_low=0.2, eps_high=0.2),
        is_weights=IS_WEIGHTS,
        ref_logprobs=REF,
        kl_coef=KL_COEF,
        kl_estimator="k3",
        entropy=entropy,
        entropy_coef=ENTROPY_COEF,
    )
    kwargs.update(overrides)
    return policy_objective(logprobs, OLD, ADVANTAGES, MASK, **kwargs), logprobs, entropy


def assert_metrics(metrics: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6), name
        assert not metrics[name].requires_grad, name


@pytest.mark.parametrize("mode", list(HAND_LOSS))
def test_weights_kl_and_entropy_together_on_a_padded_batch_by_hand(mode):
    out, _, _ = composed(mode=mode, max_len=4)
    assert out.loss.item() == pytest.approx(HAND_LOSS[mode], abs=1e-6)
    assert_metrics(out.metrics(), HAND_METRICS)


def test_the_gradient_by_hand_weights_are_constants_and_clipped_tokens_keep_only_the_kl():
    out, logprobs, entropy = composed()
    out.loss.backward()
    # a: policy clipped, KL d/dlogp = 1 − e^{−d} = −1; b: −A·w·ρ = −2, KL 0; c: clipped, KL 1 − 0.5 = 0.5
    expected = torch.tensor([[KL_COEF * -1.0, -2.0, 0.0], [KL_COEF * 0.5, 0.0, 0.0]]) / 3
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy.grad, -ENTROPY_COEF * MASK / 3, rtol=0, atol=1e-7)


def test_global_counts_divide_the_micro_batch_share():
    # the mini-batch over all devices holds 10 trained tokens (4 sequences): this micro-batch is a share of it
    out, _, _ = composed(num_tokens=torch.tensor(10.0))
    assert out.loss.item() == pytest.approx(-0.185 / 10, abs=1e-7)
    out, _, _ = composed(mode="seq-mean-token-sum", num_sequences=4)
    assert out.loss.item() == pytest.approx(-0.185 / 4, abs=1e-7)


def test_each_term_switches_off_alone():
    plain, _, _ = composed(is_weights=None, ref_logprobs=None, kl_coef=0.0, entropy=None, entropy_coef=0.0)
    assert plain.loss.item() == pytest.approx((-1.2 - 1.0 + 1.6) / 3, abs=1e-6)
    assert plain.kl_ref is None and plain.entropy is None
    assert "update/kl_ref" not in plain.metrics() and "update/entropy" not in plain.metrics()
    # a reference with kl_coef 0 is measured but adds nothing; entropies with entropy_coef 0 likewise
    measured, _, _ = composed(is_weights=None, kl_coef=0.0, entropy_coef=0.0)
    assert measured.loss.item() == pytest.approx(plain.loss.item(), abs=1e-7)
    assert measured.kl_ref.item() == pytest.approx(0.5 / 3, abs=1e-6)
    assert measured.entropy.item() == pytest.approx(3.5 / 3, abs=1e-6)


def test_a_new_policy_term_plugs_in_and_keeps_weights_kl_entropy_and_aggregation():
    def reinforce(logprobs, old_logprobs, advantages, mask):  # −A·log π per token, nothing clipped
        return PolicyLossOutput(
            per_token=-advantages[:, None] * logprobs * mask,
            ratio=torch.ones_like(logprobs),
            clip_fraction=torch.tensor(0.0),
            dual_clip_fraction=torch.tensor(0.0),
            approx_kl=torch.tensor(0.0),
        )

    out, _, _ = composed(policy_term=reinforce)
    weighted = -0.5 * math.log(0.6) - 2.0 * math.log(0.5) + 1.5 * 2.0 * math.log(0.3)
    assert out.policy_loss.item() == pytest.approx(weighted / 3, abs=1e-6)
    assert out.loss.item() == pytest.approx((weighted + KL_COEF * 0.5 - ENTROPY_COEF * 3.5) / 3, abs=1e-6)
    assert out.clip_fraction.item() == 0.0 and out.ratio_mean.item() == 1.0


def test_missing_inputs_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match="kl_coef=0.1 .* no ref_logprobs"):
        composed(ref_logprobs=None)
    with pytest.raises(ValueError, match="entropy_coef=0.01 .* no entropy"):
        composed(entropy=None)
    with pytest.raises(ValueError, match=r"is_weights has shape \(2, 2\)"):
        composed(is_weights=IS_WEIGHTS[:, :2])


# ---------------------------------------------------------------------------------- GRPO and PPO go through it
def padded_rollout():
    rollout = hand_rollout([0.0, 0.0], torch.zeros(2, 3), MASK)
    return replace(rollout, logprobs=OLD, advantages=ADVANTAGES, ref_logprobs=REF, is_weights=IS_WEIGHTS)


def test_grpo_loss_is_the_composed_loss_with_its_settings():
    module = make_module(
        kl_coef=KL_COEF, kl_estimator="k3", entropy_coef=ENTROPY_COEF, importance_correction="tis", tis_cap=2.0
    )
    logprobs = LOGPROBS.clone().requires_grad_(True)
    loss, metrics = module.loss(padded_rollout(), logprobs, ENTROPY.clone(), torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx(HAND_LOSS["token-mean"], abs=1e-6)
    assert_metrics(metrics, HAND_METRICS)
    # Dr. GRPO's aggregation divides by sampling.max_new_tokens (8 here)
    module = make_module(
        kl_coef=KL_COEF,
        entropy_coef=ENTROPY_COEF,
        importance_correction="tis",
        loss_aggregation="seq-mean-token-sum-norm",
    )
    loss, _ = module.loss(padded_rollout(), LOGPROBS.clone(), ENTROPY.clone(), torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx(sum(TOTAL) / 8 / 2, abs=1e-6)


def test_grpo_without_tis_or_kl_ignores_the_fields_and_matches_ppo():
    plain = {k: v for k, v in HAND_METRICS.items() if k != "update/kl_ref"}
    plain["update/policy_loss"] = (-1.2 - 1.0 + 1.6) / 3  # unweighted
    grpo = make_module()  # importance_correction none, kl_coef 0: is_weights and ref_logprobs are not read
    loss, metrics = grpo.loss(padded_rollout(), LOGPROBS.clone(), ENTROPY.clone(), torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert_metrics(metrics, plain)
    # PPO: token advantages (the padded 9s never count), no KL, no entropy bonus
    ppo = make_ppo()
    rollout = replace(padded_rollout(), advantages=torch.tensor([[1.0, 1.0, 9.0], [-2.0, 9.0, 9.0]]))
    loss, metrics = ppo.loss(rollout, LOGPROBS.clone(), ENTROPY.clone(), torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert_metrics(metrics, plain)
    ppo = make_ppo(loss_aggregation="seq-mean-token-mean")
    loss, _ = ppo.loss(rollout, LOGPROBS.clone(), ENTROPY.clone(), torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 1.6) / 2, abs=1e-6)


def test_a_negative_kl_coef_is_named_at_construction():
    with pytest.raises(ValueError, match="kl_coef must be >= 0 \\(got -0.1\\)"):
        make_module(kl_coef=-0.1)


# ------------------------------------------------------------------------- the small helpers defined once
@pytest.fixture(scope="module")
def text_model():
    model, tokenizer = Policy("tiny:qwen2", dtype="float32").load()
    return model, tokenizer


def test_pad_id_falls_back_to_eos_and_stop_ids_join_tokenizer_and_generation_config(text_model):
    model, tokenizer = text_model
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id != tokenizer.eos_token_id
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert pad_token_id(no_pad) == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    configured = copy.deepcopy(model.generation_config)
    stub = torch.nn.Module()  # a module carrying only a generation config
    stub.generation_config = configured
    for setting, expected in ((eos, [eos]), ([7, eos, 3], [3, 7, eos]), (None, [eos]), (5, [5, eos])):
        configured.eos_token_id = setting
        assert stop_token_ids(stub, tokenizer) == expected


def test_decode_drops_the_padding_whatever_id_it_holds(text_model):
    _, tokenizer = text_model
    ids = torch.tensor(tokenizer(["ab", "c"], padding=True, padding_side="right").input_ids)  # [2, T]
    ids = torch.cat([ids, torch.zeros(2, 2, dtype=torch.long)], dim=1)  # padding holding id 0, which decodes as "!"
    mask = torch.tensor(tokenizer(["ab", "c"], padding=True, padding_side="right").attention_mask, dtype=torch.float)
    mask = torch.cat([mask, torch.zeros(2, 2)], dim=1)
    assert tokenizer.decode([0]) == "!"
    assert decode_responses(tokenizer, ids, mask) == ["ab", "c"]


def test_cut_at_stop_by_hand():
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 9, 9, 3]])
    ids, mask, stopped = cut_at_stop(response, [2, 3], pad_id=0)
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [9, 9, 9, 3]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]] and mask.dtype == torch.float32
    assert stopped.tolist() == [True, False, True]


def test_map_micro_batches_joins_in_order_without_gradients():
    weight = torch.tensor([2.0], requires_grad=True)
    out = map_micro_batches(lambda b: b * weight, [torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    assert out.tolist() == [2.0, 4.0, 6.0] and not out.requires_grad
    assert map_micro_batches(lambda b: b, []).shape == (0,)
