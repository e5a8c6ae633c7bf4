"""Run a list of reward functions on a batch, safely: ``score(...) -> RewardScores``.

A reward function that raises, runs past its time budget, or returns something other than N
finite numbers must not take a training run down. ``score`` calls each reward function in turn,
each in its own worker thread, and waits at most ``time_budget_s`` for it; a failed call gives
``failure_score`` to its samples (only the non-finite entries, for non-finite values), is counted
in ``RewardScores.failures`` and logs one warning per (reward, kind of failure) per process.

Why threads rather than processes: reward functions may hold things that cannot be pickled or
shared with another process (a reasoner model on the GPU, an inference-server client, a judge),
and a thread starts in microseconds. A thread cannot be killed, so a timed-out call is abandoned:
it runs on in the background (as a daemon thread, so it never blocks interpreter exit) while
training continues, and the number of such threads still alive is reported in the warning.
Grading is kept from hanging in the first place: ``vlrl.rewards.grading`` caps what reaches sympy
and, off the main thread, turns math-verify's ``signal.alarm`` timeouts off (they only work in the
main thread), relying on this budget instead.

The worst case for one ``score`` call is ``len(reward_fns) * time_budget_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlrl.rewards.functions import RewardFunction, RewardUnavailable, reward_kwargs

__all__ = ["RewardScores", "score"]

log = logging.getLogger(__name__)

_warned: set[tuple[str, str]] = set()
_abandoned: list[threading.Thread] = []


@dataclass
class RewardScores:
    """Rewards of N samples.

    Attributes:
        total: weighted sum of the components. [N]
        components: each reward's unweighted scores, by reward name. name -> [N]
        failures: per reward name, how many of its calls failed (raised, timed out, returned a
            wrong length or non-finite values); 0 or 1 for one ``score`` call.
    """

    total: torch.Tensor  # [N]
    components: dict[str, torch.Tensor]  # name -> [N]
    failures: dict[str, int]


def _warn_once(name: str, kind: str, message: str) -> None:
    if (name, kind) not in _warned:
        _warned.add((name, kind))
        log.warning("reward %r %s (failure_score used; warned once per reward and kind)", name, message)


def _call_with_deadline(
    fn: RewardFunction, completions: list[str], kwargs: dict[str, Any], budget_s: float
) -> tuple[Any, str | None, str]:
    """Call ``fn`` in a daemon thread; returns (result, failure kind or None, detail)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(completions, **kwargs)
        except BaseException as error:  # noqa: BLE001 - any failure of a reward is contained
            box["error"] = error

    thread = threading.Thread(target=target, name=f"reward-{fn.name}", daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        _abandoned.append(thread)
        return None, "timeout", f"exceeded its time budget of {budget_s:g} s"
    if "error" in box:
        error = box["error"]
        if isinstance(error, RewardUnavailable):
            raise error  # not a failure to score around: the step must not train on it
        return None, "exception", f"raised {type(error).__name__}: {error}"
    log.debug("reward %r took %.3f s", fn.name, time.monotonic() - start)
    return box["result"], None, ""


def _validate(result: Any, n: int, failure_score: float) -> tuple[torch.Tensor | None, str | None, str]:
    """``result`` as a float tensor [n] (non-finite entries replaced); or None and why not."""
    try:
        values = torch.as_tensor(result, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        return None, "bad_type", f"returned {type(result).__name__}, not a list of floats ({error})"
    if values.shape != (n,):
        return None, "wrong_length", f"returned shape {tuple(values.shape)} for {n} completions"
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        values = torch.where(finite, values, torch.full_like(values, failure_score))
        return values, "non_finite", f"returned {bad} non-finite value(s) of {n}"
    return values, None, ""


def _check_inputs(reward_fns: Sequence[RewardFunction], n: int, inputs: dict[str, Any]) -> None:
    names = [fn.name for fn in reward_fns]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"reward names {duplicates} are used twice: set a distinct `name` init arg")
    facts = inputs["facts"]
    if not isinstance(facts, dict):
        raise ValueError(f"facts is a {type(facts).__name__}: give a dict of per-sample lists, name -> N values")
    lists = {**{k: v for k, v in inputs.items() if k != "facts"}, **{f"facts[{k!r}]": v for k, v in facts.items()}}
    for key, values in lists.items():
        if values is None:
            continue
        if not isinstance(values, list):
            raise ValueError(f"{key} is a {type(values).__name__}: give a list with one entry per completion")
        if len(values) != n:
            raise ValueError(f"{key} has {len(values)} entries for {n} completions")


def score(
    reward_fns: Sequence[RewardFunction],
    completions: list[str],
    *,
    answers: list[str],
    choices: list[list[str] | None],
    finish_reasons: list[str],
    data_sources: list[str] | None = None,
    questions: list[str] | None = None,
    images: list[list[Any]] | None = None,
    facts: dict[str, list[Any]] | None = None,
    time_budget_s: float = 60.0,
    failure_score: float = 0.0,
) -> RewardScores:
    """Score N completions with every reward function; never raises because of a reward.

    Every reward is called with the keywords of the protocol (``vlrl.rewards.functions``): the
    per-sample lists below (None where not given) and ``facts`` (``{}`` where not given).

    Args:
        reward_fns: the reward functions (distinct names).
        completions: the N decoded responses.
        answers: gold answer per sample.
        choices: option texts per sample (None for free-form questions).
        finish_reasons: ``"stop"`` or ``"length"`` per sample.
        data_sources: data source per sample.
        questions: raw question text per sample.
        images: the images of each sample's prompt.
        facts: what callbacks know about each sample (``Rollout.facts``), name -> N values; given
            to the rewards as this one dict, so a fact cannot shadow another keyword.
        time_budget_s: the longest one reward call may take.
        failure_score: score given to the samples of a failed reward call.

    Returns:
        The weighted total, the unweighted components and the failure counts.

    Raises:
        RewardUnavailable: re-raised from a reward whose backend is down past its outage budget.
        ValueError: on caller errors only: duplicate reward names, per-sample lists (or facts) of
            the wrong length or type.

    Example:
        >>> from vlrl.rewards.functions import AccuracyReward, BoxedFormatReward
        >>> scores = score([AccuracyReward(), BoxedFormatReward(weight=0.5)], [r"\\boxed{4}", "4"],
        ...                answers=["4", "4"], choices=[None, None], finish_reasons=["stop", "stop"])
        >>> scores.total.tolist()
        [1.5, 0.0]
    """
    n = len(completions)
    call_kwargs = reward_kwargs(answers, choices, finish_reasons, data_sources, questions, images, facts)
    _check_inputs(reward_fns, n, call_kwargs)
    _abandoned[:] = [thread for thread in _abandoned if thread.is_alive()]
    total = torch.zeros(n)  # [N]
    components: dict[str, torch.Tensor] = {}
    failures: dict[str, int] = {}
    for fn in reward_fns:
        values, kind, detail = None, None, ""
        if n:
            result, kind, detail = _call_with_deadline(fn, completions, call_kwargs, time_budget_s)
            if kind is None:
                values, kind, detail = _validate(result, n, failure_score)
        else:
            values = torch.zeros(0)
        if kind is not None:
            if kind == "timeout":
                detail += f"; {len(_abandoned)} timed-out reward call(s) still running in the background"
            _warn_once(fn.name, kind, detail)
        components[fn.name] = values if values is not None else torch.full((n,), float(failure_score))
        failures[fn.name] = int(kind is not None)
        total += fn.weight * components[fn.name]
    return RewardScores(total=total, components=components, failures=failures)
