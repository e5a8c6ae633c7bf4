"""The package's floors: the hook protocol and the template check sit below the modules that use them,
and the names that moved (``RLCallback``, ``check_template_fields``, ``RandomState``) work where they went."""

from __future__ import annotations

import random
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import vlrl.callbacks
import vlrl.hooks
import vlrl.rewards.caption
from tests.test_grpo import make_module
from vlrl.callbacks import RandomState, SequenceLengthCurriculum
from vlrl.callbacks.random_state import random_state, set_random_state
from vlrl.data import PreferencePairs, RLDataModule, SyntheticPairs
from vlrl.data.prompts import check_template_fields
from vlrl.hooks import RolloutLength


def loaded_after(*modules: str) -> list[set[str]]:
    """The ``vlrl`` packages (one level down) a fresh interpreter holds after importing each module in turn."""
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({m!r}); print(*sorted({{'.'.join(k.split('.')[:2]) for k in sys.modules "
        "if k.startswith('vlrl.')}))\n"
        for m in modules
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return [set(line.split()) for line in done.stdout.splitlines()]


def test_methods_do_not_import_callbacks_nor_data_rewards():
    """The hooks need only the types; vlrl.data never loads vlrl.rewards; the methods call the hooks
    (vlrl.hooks) and never load vlrl.callbacks."""
    hooks, data, methods = loaded_after("vlrl.hooks", "vlrl.data", "vlrl.methods")
    assert hooks == {"vlrl.hooks", "vlrl.types"}
    assert "vlrl.rewards" not in data
    assert "vlrl.hooks" in methods and "vlrl.callbacks" not in methods


def test_rlcallback_is_one_class_under_its_names():
    assert vlrl.callbacks.RLCallback is vlrl.hooks.RLCallback


class LengthOnly(pl.LightningModule):
    """Not an RL method: a module with nothing but the documented rollout length."""

    def __init__(self) -> None:
        super().__init__()
        self.max_new_tokens = 100


def test_curriculum_takes_any_module_with_a_rollout_length():
    """The curriculum checks the attribute it sets (vlrl.hooks.RolloutLength), not the method class."""
    module, trainer = LengthOnly(), pl.Trainer(logger=False, max_steps=10)
    assert isinstance(module, RolloutLength) and isinstance(make_module(), RolloutLength)
    assert not isinstance(pl.LightningModule(), RolloutLength)
    curriculum = SequenceLengthCurriculum({0: 8, 3: 16})
    curriculum.setup(trainer, module, "fit")
    curriculum.current = 16  # as restored from a checkpoint
    curriculum.on_train_start(trainer, module)
    assert module.max_new_tokens == 16


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{question} {{literal}} {choices}", None),
        (
            "Answer in \\boxed{{}}.",
            r"prompt_template='Answer in \\\\boxed\{\{\}\}.' lacks the field\(s\) \['question'\]",
        ),
        ("{question} {answer}", r"uses unknown field\(s\) \['answer'\]; the fields are \['choices', 'question'\]"),
        ("{question} {", r"prompt_template='\{question\} \{' is not a valid format string"),
    ],
)
def test_one_template_check_serves_data_and_rewards(template, message):
    assert vlrl.rewards.caption.check_template_fields is check_template_fields
    if message is None:
        check_template_fields("prompt_template", template, {"question"}, {"choices"})
        RLDataModule(prompt_template=template)
        return
    with pytest.raises(ValueError, match=message):
        check_template_fields("prompt_template", template, {"question"}, {"choices"})
    with pytest.raises(ValueError, match=message):
        RLDataModule(prompt_template=template)


def test_preference_pairs_check_their_prompts_without_the_rewards():
    with pytest.raises(ValueError, match=r"generation_prompt='Which image\?' lacks the field\(s\) \['caption'\]"):
        PreferencePairs(SyntheticPairs("train", size=2), generation_prompt="Which image?")


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """What RandomState saves (in its new home, under its old state key) restores all three generators."""
    assert RandomState.__module__ == "vlrl.callbacks.random_state"
    assert RandomState().state_key == "RandomState"  # checkpoints written before the move still restore
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(RandomState().state_dict(), tmp_path / "state.pt")
    expected = draws()
    draws()
    callback = RandomState()
    callback.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    callback.on_train_start(pl.Trainer(logger=False), pl.LightningModule())
    assert draws() == expected
    set_random_state(random_state())  # the helpers moved with it
    assert random_state()["torch"].equal(torch.get_rng_state())
