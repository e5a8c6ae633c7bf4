"""Every shipped config parses, and the CLI documents each constructor argument."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlrl.cli import main

CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
TRAINER_OVERLAYS = [c for c in CONFIGS if "/trainer/" in c]
ROLLOUT_OVERLAYS = [c for c in CONFIGS if "/rollout/" in c]
EVAL_OVERLAYS = [c for c in CONFIGS if "/eval/" in c]
FULL_CONFIGS = [c for c in CONFIGS if c not in TRAINER_OVERLAYS + ROLLOUT_OVERLAYS + EVAL_OVERLAYS]


def test_there_are_configs():
    assert any(c.endswith("configs/grpo.yaml") for c in FULL_CONFIGS)
    assert any(c.endswith("configs/demo/grpo.yaml") for c in FULL_CONFIGS)


@pytest.mark.parametrize("config", FULL_CONFIGS, ids=lambda c: c.split("configs/")[-1])
def test_config_parses_with_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: vlrl." in printed
    first = Path(config).read_text().splitlines()
    assert any("lightning-cli" in line for line in first[:4]), "a config opens with the command that runs it"


@pytest.mark.parametrize("overlay", TRAINER_OVERLAYS, ids=lambda c: c.split("configs/")[-1])
def test_trainer_overlay_parses_over_a_demo_config(overlay, capsys):
    demo = next(c for c in FULL_CONFIGS if c.endswith("configs/demo/grpo.yaml"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", demo, "--config", overlay, "--print_config"])
    assert exit_info.value.code == 0
    assert "strategy:" in capsys.readouterr().out
    first = Path(overlay).read_text().splitlines()
    assert any("lightning-cli" in line for line in first[:4]), "an overlay opens with the command that runs it"


@pytest.mark.parametrize("overlay", EVAL_OVERLAYS, ids=lambda c: c.split("configs/")[-1])
def test_eval_overlay_parses_over_the_paper_config(overlay, capsys):
    """Each benchmark overlay over the real config its command names (tests/test_evaluation.py runs them)."""
    first = Path(overlay).read_text().splitlines()
    command = next(line for line in first[:6] if "lightning-cli test" in line)
    method = command.split("--config ")[1].split()[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", method, "--config", overlay, "--print_config"])
    assert exit_info.value.code == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    assert merged["data"]["init_args"]["test"]["class_path"].startswith("vlrl.data.")
    assert Path(overlay).stem.replace("_", "") in merged["data"]["init_args"]["test"]["class_path"].lower()


@pytest.mark.parametrize("overlay", ROLLOUT_OVERLAYS, ids=lambda c: c.split("configs/")[-1])
@pytest.mark.parametrize("method", ["grpo.yaml", "racro.yaml", "vl_rethinker.yaml", "unified_reward_think/grpo.yaml"])
def test_rollout_overlay_parses_over_each_grpo_family_config(overlay, method, capsys):
    config = next(c for c in FULL_CONFIGS if c.endswith(f"configs/{method}"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--config", overlay, "--print_config"])
    assert exit_info.value.code == 0
    merged = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert merged["rollout_engine"]["class_path"] == "vlrl.rollout.VLLMEngine"
    assert merged["importance_correction"] == "tis"
    # plain temperature sampling (what vLLM's log-probs allow); the method's temperature and length are kept
    original = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["sampling"]
    assert [merged["sampling"][k] for k in ("temperature", "max_new_tokens")] == [
        original[k] for k in ("temperature", "max_new_tokens")
    ]
    assert (merged["sampling"]["top_p"], merged["sampling"]["top_k"]) == (1.0, 0)
    first = Path(overlay).read_text().splitlines()
    assert any("lightning-cli" in line for line in first[:4]), "an overlay opens with the command that runs it"


@pytest.mark.parametrize("config", FULL_CONFIGS, ids=lambda c: c.split("configs/")[-1])
def test_config_keys_are_constructor_arguments(config):
    """A misspelt key must fail the parse: LightningCLI checks every key against the signatures."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--model.init_args.not_an_argument=1", "--print_config"])
    assert exit_info.value.code != 0


def test_model_help_shows_constructor_docstrings():
    out = subprocess.run(
        [sys.executable, "-m", "vlrl.cli", "fit", "--model.help", "vlrl.methods.GRPO"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for phrase in (
        "--model.group_size",
        "Samples per prompt",
        "--model.eps_high",
        "clip-higher",
        "--model.kl_coef",
        "--model.policy.freeze_vision",
        "Freeze the vision tower",
    ):
        assert phrase in text, phrase
