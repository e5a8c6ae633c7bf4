"""Run a list of reward functions on a batch, safely: ``score(...) -> RewardScores``.

A reward function that raises, hangs, burns CPU, crashes its process, changes its inputs or returns
something other than N finite numbers must not take a training run down or slow it. ``score`` calls
each reward function in turn and waits at most ``time_budget_s`` for it; a failed call gives
``failure_score`` to its samples (only the non-finite entries, for non-finite values), is counted in
``RewardScores.failures`` and logs one warning per (reward, kind of failure) per process.

Where a reward runs is its ``isolation`` (``vlrl.rewards.RewardFunction``):

- ``"process"`` (pure-Python rewards: graders, format checks, most user rewards): in a worker process
  kept for the whole run (started once, from a fork server that has imported ``vlrl.rewards``; the
  first call pays about a second, later ones a pipe round trip). A call past its budget is stopped by
  killing the worker, which is replaced at the next call, outside the budget; a worker that dies is
  replaced the same way. So a busy loop cannot hold the trainer's interpreter, and grading keeps
  math-verify's own ``signal.alarm`` timeouts (they work in a worker's main thread). The reward is
  pickled for each call (a small object: it must hold no model) with copies of the inputs, but not
  the images (``images=None``: pixels are not copied to another process every step); the global
  random generators (``random``, NumPy, torch) go with the call and come back, so a reward that draws
  from them moves the trainer's streams exactly as it would in-process. State the reward changes on
  itself stays in the worker's copy.
- ``"thread"`` (rewards that hold a model, a GPU or a client: ``JudgeReward``, anything with a
  ``setup``): in a daemon thread of the trainer, on copies of the input lists. A thread cannot be
  killed, so a timed-out call is abandoned and runs on in the background; the number still alive is
  reported in the warning. Such rewards bound their own calls (retries over an outage budget).

A reward that cannot be pickled (or is defined in ``__main__``) runs as ``"thread"``, with a warning.
``RewardUnavailable`` raised by a reward (its backend down past its outage budget) is re-raised: the
step must not train on it. ``FailureStreaks`` stops a run whose reward gives no usable score for too
many steps in a row.

The worst case for one ``score`` call is ``len(reward_fns) * time_budget_s``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import pickle
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from vlrl.rewards.functions import RewardFunction, RewardUnavailable, reward_kwargs

__all__ = ["FailureStreaks", "RewardFailureError", "RewardScores", "score"]

log = logging.getLogger(__name__)

WORKER_START_S = 120.0  # longest wait for a new worker process to be ready (imports), outside any budget

_warned: set[tuple[str, str]] = set()
_abandoned: list[threading.Thread] = []


@dataclass
class RewardScores:
    """Rewards of N samples.

    Attributes:
        total: weighted sum of the components. [N]
        components: each reward's unweighted scores, by reward name. name -> [N]
        failures: per reward name, how many of its calls failed (raised, timed out, crashed, returned a
            wrong length or non-finite values); 0 or 1 for one ``score`` call.
        unusable: the rewards whose call gave no usable score at all (every failure but some
            non-finite values), name -> what went wrong; what ``FailureStreaks`` counts.
    """

    total: torch.Tensor  # [N]
    components: dict[str, torch.Tensor]  # name -> [N]
    failures: dict[str, int]
    unusable: dict[str, str] = field(default_factory=dict)


class RewardFailureError(RuntimeError):
    """A reward gave no usable score in too many steps in a row (see ``FailureStreaks``)."""


class FailureStreaks:
    """Counts, per reward, the steps in a row in which it gave no usable score; ``limit`` stop the run.

    A reward that fails now and then scores ``failure_score`` on those steps and training goes on; one
    that fails on every step (a bug, a missing dependency) would otherwise train on a constant reward
    for the rest of the run. Only whole failures count (``RewardScores.unusable``): a judge that cannot
    read a few verdicts per step is not failing.

    Args:
        limit: steps in a row after which the run stops with ``RewardFailureError`` naming the reward;
            None never stops.

    Example:
        >>> streaks = FailureStreaks(limit=2)
        >>> streaks.update({"judge": "raised ConnectionError: refused"}, ["judge", "format"])
        >>> streaks.update({}, ["judge", "format"])  # a usable step resets the count
        >>> streaks.update({"judge": "raised ConnectionError: refused"}, ["judge", "format"])
        >>> streaks.counts
        {'judge': 1, 'format': 0}
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(
                f"max_reward_failure_steps={limit!r} must be a number of steps >= 1, or null to never stop"
            )
        self.limit = limit
        self.counts: dict[str, int] = {}

    def update(self, unusable: dict[str, str], names: Sequence[str]) -> None:
        """Count one step of the rewards ``names``, of which those in ``unusable`` gave no usable score.

        Raises:
            RewardFailureError: a reward reached ``limit`` steps in a row; the message names it and its
                last failure.
        """
        for name in names:
            self.counts[name] = self.counts.get(name, 0) + 1 if name in unusable else 0
        if self.limit is None:
            return
        for name in names:
            if self.counts[name] >= self.limit:
                raise RewardFailureError(
                    f"reward {name!r} gave no usable score in {self.counts[name]} steps in a row (last: "
                    f"{unusable[name]}); fix the reward (or its server) and resume from the last checkpoint, "
                    "or raise model.max_reward_failure_steps (null: never stop)"
                )


def _warn_once(name: str, kind: str, message: str) -> None:
    if (name, kind) not in _warned:
        _warned.add((name, kind))
        log.warning("reward %r %s (failure_score used; warned once per reward and kind)", name, message)


# ------------------------------------------------------------------------------------- copies of inputs
def _copied(value: Any) -> Any:
    """``value`` with every list and dict in it copied (their leaves shared): what a reward gets to change."""
    if isinstance(value, list):
        return [_copied(v) if isinstance(v, list | dict) else v for v in value]
    if isinstance(value, dict):
        return {k: _copied(v) if isinstance(v, list | dict) else v for k, v in value.items()}
    return value


def _rng_states() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_states(states: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


# ------------------------------------------------------------------------------------ worker processes
def _serve(conn: Connection) -> None:
    """A worker process: call the rewards sent over ``conn`` until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops the worker
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "import":  # a reward's module, imported before its first call's budget starts
            try:
                importlib.import_module(message[1])
            except BaseException as error:  # noqa: BLE001 - reported by the call that needs it
                log.debug("module %s of a reward cannot be imported: %r", message[1], error)
            conn.send("imported")
            continue
        _, payload, completions, kwargs, states = message
        _set_rng_states(states)
        try:
            fn = pickle.loads(payload)
        except Exception as error:  # noqa: BLE001 - reported to the trainer
            reply: tuple[Any, ...] = ("exception", f"cannot be loaded in a worker process ({error!r})")
        else:
            try:
                reply = ("ok", fn(completions, **kwargs))
            except RewardUnavailable as error:
                reply = ("unavailable", str(error))
            except BaseException as error:  # noqa: BLE001 - any failure of a reward is contained
                reply = ("exception", f"raised {type(error).__name__}: {error}")
        try:
            conn.send((*reply, _rng_states()))
        except Exception as error:  # noqa: BLE001 - an unpicklable result
            conn.send(("exception", f"returned a value that cannot leave its worker process ({error!r})", None))


class WorkerStartError(RuntimeError):
    """A worker process could not be started; the runner then calls every reward in a thread."""


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start a process without it re-running the trainer's ``__main__`` (spawn and forkserver children do).

    A training script without an ``if __name__ == "__main__":`` guard would otherwise train again inside
    the reward worker (and, under several ranks, wait there for a process group). Rewards defined in
    ``__main__`` never go to a worker, so the worker does not need it.
    """
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _Worker:
    """One worker process and its pipe; started by the constructor, ready when it returns."""

    def __init__(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if context.get_start_method() == "forkserver":
            context.set_forkserver_preload(["vlrl.rewards"])  # imported once; each worker forks with it loaded
        self.modules: set[str] = set()  # reward modules imported in this worker
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name="vlrl-reward-worker", daemon=True)
        with _main_not_rerun():
            self.process.start()
        child.close()
        try:
            ready = self.conn.poll(WORKER_START_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise WorkerStartError(
                f"a reward worker process did not start within {WORKER_START_S:g} s (exit code "
                f"{self.process.exitcode}; a script run from stdin or one that cannot be imported again stops them)"
            )

    def load(self, module: str) -> None:
        """Import ``module`` in the worker (once), so that its import time is not charged to a call's budget."""
        if module not in self.modules:
            self.conn.send(("import", module))
            if not self.conn.poll(WORKER_START_S):
                raise EOFError(f"importing {module} in the worker took over {WORKER_START_S:g} s")
            self.conn.recv()
            self.modules.add(module)

    def stop(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


_worker: _Worker | None = None


def _call_in_process(
    fn: RewardFunction, payload: bytes, completions: list[str], kwargs: dict[str, Any], budget_s: float
) -> tuple[Any, str | None, str]:
    """Call the pickled ``fn`` in the worker process; returns (result, failure kind or None, detail)."""
    global _worker
    if _worker is None or not _worker.process.is_alive():
        _worker = _Worker()  # (re)started here, before the budget's clock starts; raises if it cannot start
    worker = _worker
    try:
        worker.load(type(fn).__module__)
        start = time.monotonic()
        worker.conn.send(("call", payload, completions, {**kwargs, "images": None}, _rng_states()))
        if not worker.conn.poll(budget_s):
            worker.stop()
            _worker = None
            return None, "timeout", f"exceeded its time budget of {budget_s:g} s (its worker process was stopped)"
        kind, value, states = worker.conn.recv()
    except (EOFError, OSError):
        worker.process.join(5)
        _worker = None
        return None, "crashed", f"killed its worker process (exit code {worker.process.exitcode})"
    if states is not None:
        _set_rng_states(states)
    if kind == "unavailable":
        raise RewardUnavailable(value)  # not a failure to score around: the step must not train on it
    if kind == "exception":
        return None, "exception", value
    log.debug("reward %r took %.3f s in a worker process", fn.name, time.monotonic() - start)
    return value, None, ""


def _call_in_thread(
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
        detail = f"exceeded its time budget of {budget_s:g} s"
        return None, "timeout", f"{detail}; {len(_abandoned)} timed-out reward call(s) still running in the background"
    if "error" in box:
        error = box["error"]
        if isinstance(error, RewardUnavailable):
            raise error  # not a failure to score around: the step must not train on it
        return None, "exception", f"raised {type(error).__name__}: {error}"
    log.debug("reward %r took %.3f s", fn.name, time.monotonic() - start)
    return box["result"], None, ""


def _call(fn: RewardFunction, completions: list[str], kwargs: dict[str, Any], budget_s: float):
    """Call ``fn`` on copies of its inputs where its ``isolation`` says; returns (result, kind, detail)."""
    completions, kwargs = list(completions), _copied(kwargs)
    if isinstance(fn, RewardFunction) and fn.isolation == "process":
        try:
            if type(fn).__module__ == "__main__":
                raise pickle.PicklingError(f"{type(fn).__name__} is defined in __main__, which workers do not import")
            payload = pickle.dumps(fn)
        except Exception as error:  # noqa: BLE001 - pickle raises many types
            _warn_once(
                fn.name,
                "not_picklable",
                f"cannot be sent to a worker process ({error!r}) and runs in a thread of the trainer, where a hung "
                "call cannot be stopped; define it in an importable module with picklable attributes, or set "
                "isolation = 'thread' on its class to say so",
            )
        else:
            try:
                return _call_in_process(fn, payload, completions, kwargs, budget_s)
            except WorkerStartError as error:
                _warn_once("*", "no_workers", f"{error}: rewards run in threads of the trainer")
    return _call_in_thread(fn, completions, kwargs, budget_s)


# ------------------------------------------------------------------------------------------ scoring
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
        return values, "non_finite" if bad < n else "all_non_finite", f"returned {bad} non-finite value(s) of {n}"
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
    """Score N completions with every reward function; never raises because of a reward (but see Raises).

    Every reward is called with the keywords of the protocol (``vlrl.rewards.functions``): the
    per-sample lists below (None where not given) and ``facts`` (``{}`` where not given), as copies,
    so that a reward changing them changes nothing for the next reward or the caller.

    Args:
        reward_fns: the reward functions (distinct names).
        completions: the N decoded responses.
        answers: gold answer per sample.
        choices: option texts per sample (None for free-form questions).
        finish_reasons: ``"stop"`` or ``"length"`` per sample.
        data_sources: data source per sample.
        questions: raw question text per sample.
        images: the images of each sample's prompt (given to ``"thread"`` rewards only).
        facts: what callbacks know about each sample (``Rollout.facts``), name -> N values; given
            to the rewards as this one dict, so a fact cannot shadow another keyword.
        time_budget_s: the longest one reward call may take (a reward's ``min_time_budget_s``, such
            as a served judge's outage budget, raises it for that reward).
        failure_score: score given to the samples of a failed reward call.

    Returns:
        The weighted total, the unweighted components, the failure counts and the unusable calls.

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
    unusable: dict[str, str] = {}
    for fn in reward_fns:
        values, kind, detail = None, None, ""
        if n:
            budget_s = max(time_budget_s, fn.min_time_budget_s if isinstance(fn, RewardFunction) else 0.0)
            result, kind, detail = _call(fn, completions, call_kwargs, budget_s)
            if kind is None:
                values, kind, detail = _validate(result, n, failure_score)
        else:
            values = torch.zeros(0)
        if kind is not None:
            _warn_once(fn.name, kind, detail)
            if kind != "non_finite":  # some finite values are still a score
                unusable[fn.name] = detail
        components[fn.name] = values if values is not None else torch.full((n,), float(failure_score))
        failures[fn.name] = int(kind is not None)
        total += fn.weight * components[fn.name]
    return RewardScores(total=total, components=components, failures=failures, unusable=unusable)
