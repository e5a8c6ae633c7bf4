"""Checkpoint averaging: exact uniform means, which steps are kept, HF export, LoRA, and ``vlrl-average``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.test_grpo import make_data as make_grpo_data
from tests.test_grpo import make_module as make_grpo_module
from vlrl.averaging import average_state_dicts, average_tensors, main
from vlrl.callbacks import CheckpointAveraging
from vlrl.data import SFTDataModule, Synthetic
from vlrl.methods import SFT
from vlrl.models import LoRA, Policy
from vlrl.models.inputs import encode_prompt

TEMPLATE = "{question}\nPut your final answer within \\boxed{{}}."


class WeightRecorder(pl.Callback):
    """Copies every parameter of ``module.model`` after each training step, independently of the averaging."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.at[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.state_dict().items()}


def exact_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)


def sft_module() -> SFT:
    return SFT(
        Policy("tiny:qwen2_5_vl", dtype="float32", freeze_vision=True),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        max_length=512,
        pack=True,
    )


def sft_data() -> SFTDataModule:
    train = Synthetic("train", size=16, text_only=True)
    return SFTDataModule(train=train, batch_size=2, prompt_template=TEMPLATE, shuffle=False)


def trainer_with(callbacks: list[pl.Callback], max_steps: int, root: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )


def generates(hf_dir: Path) -> torch.Tensor:
    """Load ``hf_dir`` with transformers alone and generate a few tokens for an image prompt."""
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = encode_prompt(processor, messages, [Image.new("RGB", (56, 56), "red")])
    out = model.generate(
        **prompt.token_inputs, **prompt.media_inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    assert out.shape[1] == prompt.length + 4
    return model


# --- the math and the rules ----------------------------------------------------------------------------------------


def test_average_is_the_exact_uniform_mean():
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), torch.tensor([6.0, 0.0])
    assert torch.equal(average_tensors([a, b, c]), torch.tensor([3.0, 2.0]))
    bf16 = average_tensors([torch.tensor([1.0, 1.5], dtype=torch.bfloat16), torch.tensor([2.0, 2.0]).bfloat16()])
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, torch.tensor([1.5, 1.75], dtype=torch.bfloat16))
    steps = torch.tensor([3, 4])
    assert torch.equal(average_tensors([steps, steps.clone()]), steps)  # equal integer tensors are kept
    with pytest.raises(ValueError, match="integer tensor that differs"):
        average_tensors([steps, steps + 1])
    with pytest.raises(ValueError, match="shape"):
        average_tensors([a, torch.zeros(3)])
    with pytest.raises(ValueError, match="same tensors"):
        average_state_dicts([{"w": a}, {"v": a}])


def test_which_steps_are_kept():
    assert CheckpointAveraging(steps=[900, 700, 800], ckpt_path="x").chosen_steps(900) == [700, 800, 900]
    every = CheckpointAveraging(every_n_steps=50, last_n_steps=200, ckpt_path="x")
    assert every.chosen_steps(900) == [750, 800, 850, 900]  # 700 is not within the last 200 steps
    assert every.chosen_steps(905) == [755, 805, 855, 905]  # counted back from the final step
    assert CheckpointAveraging(every_n_steps=3, last_n_steps=7, ckpt_path="x").chosen_steps(10) == [4, 7, 10]
    assert CheckpointAveraging(every_n_steps=1, last_n_steps=1, ckpt_path="x").chosen_steps(30) == [30]
    assert CheckpointAveraging(every_n_steps=5, last_n_steps=100, ckpt_path="x").chosen_steps(12) == [2, 7, 12]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(steps=[1], every_n_steps=1, last_n_steps=1, ckpt_path="x"), "not both"),
        (dict(ckpt_path="x"), "not neither"),
        (dict(every_n_steps=2, ckpt_path="x"), "must both be set"),
        (dict(steps=[0], ckpt_path="x"), "steps >= 1"),
        (dict(steps=[1]), "hf_dir and/or ckpt_path"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointAveraging(**kwargs)


def test_a_text_model_exports_for_auto_model_for_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlrl.averaging import export_hf

    model, tokenizer = Policy("tiny:qwen2", dtype="float32").load()
    state = {k: v + 1.0 for k, v in model.state_dict().items()}  # weights the export must carry over
    export_hf(model, tokenizer, state, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model.lm_head.weight + 1.0, loaded.lm_head.weight)  # the live model was not touched
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")("what colour", return_tensors="pt").input_ids
    assert loaded.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


# --- during training ------------------------------------------------------------------------------------------------


def test_sft_run_averages_the_kept_steps_and_exports_a_loadable_hf_model(tmp_path):
    recorder = WeightRecorder()
    window = CheckpointAveraging(
        every_n_steps=2, last_n_steps=4, hf_dir=str(tmp_path / "hf"), ckpt_path=str(tmp_path / "avg.ckpt")
    )
    explicit = CheckpointAveraging(
        steps=[1, 3],
        ckpt_path=str(tmp_path / "explicit.ckpt"),
        snapshot_dir=str(tmp_path / "snaps"),
        keep_snapshots=False,
    )
    module = sft_module()
    trainer_with([recorder, window, explicit], max_steps=6, root=tmp_path).fit(module, datamodule=sft_data())

    assert sorted(window.kept) == [4, 6] and sorted(explicit.kept) == [1, 3]
    assert not any((tmp_path / "snaps").iterdir())  # keep_snapshots: false removes them after writing
    assert all(Path(p).is_file() for p in window.kept.values())
    for steps, path in (([4, 6], "avg.ckpt"), ([1, 3], "explicit.ckpt")):
        ckpt = torch.load(tmp_path / path, weights_only=True)
        assert ckpt["averaged_steps"] == steps
        for name in recorder.at[6]:
            expected = exact_mean([recorder.at[s][name] for s in steps])
            assert torch.equal(ckpt["state_dict"][f"model.{name}"], expected), name
    ckpt = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    visual = [n for n in recorder.at[6] if ".visual." in n]
    assert visual and all(torch.equal(ckpt["state_dict"][f"model.{n}"], recorder.at[6][n]) for n in visual)
    assert any(not torch.equal(ckpt["state_dict"][f"model.{n}"], recorder.at[6][n]) for n in recorder.at[6])

    model = generates(tmp_path / "hf")
    hf_state = model.state_dict()
    assert all(torch.equal(hf_state[n], ckpt["state_dict"][f"model.{n}"]) for n in recorder.at[6])
    fresh = sft_module()
    fresh.configure_model()
    fresh.load_state_dict(ckpt["state_dict"])  # the Lightning checkpoint loads into the method (strict)


def test_lora_grpo_run_averages_the_adapters_and_exports_them_merged(tmp_path):
    recorder = WeightRecorder()
    averaging = CheckpointAveraging(steps=[2, 3], hf_dir=str(tmp_path / "hf"), ckpt_path=str(tmp_path / "avg.ckpt"))
    module = make_grpo_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32", lora=LoRA(rank=4, alpha=8)))
    trainer_with([recorder, averaging], max_steps=3, root=tmp_path).fit(module, datamodule=make_grpo_data())

    snapshot = torch.load(averaging.kept[2], weights_only=True)
    assert snapshot and all("lora_" in k for k in snapshot)  # only the adapters are snapshotted
    ckpt = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    adapters = [n for n in recorder.at[3] if "lora_" in n]
    assert any(not torch.equal(recorder.at[2][n], recorder.at[3][n]) for n in adapters)
    for name in adapters:
        assert torch.equal(ckpt["state_dict"][f"model.{name}"], exact_mean([recorder.at[s][name] for s in (2, 3)]))

    model = generates(tmp_path / "hf")  # a plain model: no peft needed to load it
    assert not any("lora" in k for k in model.state_dict())
    reference, _ = Policy("tiny:qwen2_5_vl", dtype="float32", lora=LoRA(rank=4, alpha=8)).load()
    reference.load_state_dict({k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    merged = reference.merge_and_unload().state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, merged[name], atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.filterwarnings("ignore:CheckpointAveraging")
def test_a_resumed_run_averages_the_snapshots_of_both_parts(tmp_path):
    def run(max_steps: int, ckpt_path: str | None = None):
        recorder = WeightRecorder()
        averaging = CheckpointAveraging(steps=[2, 5], ckpt_path=str(tmp_path / "avg.ckpt"))
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, filename="{step}")
        trainer = trainer_with([recorder, averaging, saver], max_steps=max_steps, root=tmp_path)
        trainer.fit(sft_module(), datamodule=sft_data(), ckpt_path=ckpt_path)
        return recorder, averaging

    first, _ = run(3)
    second, averaging = run(5, str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert sorted(averaging.kept) == [2, 5]  # step 2 came back with the callback's checkpoint state
    ckpt = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    name = "lm_head.weight"
    assert torch.equal(ckpt["state_dict"][f"model.{name}"], exact_mean([first.at[2][name], second.at[5][name]]))


# --- vlrl-average on existing checkpoint files --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
def test_vlrl_average_command_on_checkpoint_files(tmp_path):
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer_with([every_step], max_steps=3, root=tmp_path).fit(sft_module(), datamodule=sft_data())
    first, third = tmp_path / "ckpt" / "step=1.ckpt", tmp_path / "ckpt" / "step=3.ckpt"
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: vlrl.methods.SFT\n  init_args:\n"
        "    policy: {model_path: 'tiny:qwen2_5_vl', dtype: float32, freeze_vision: true}\n"
        "    max_length: 512\n    pack: true\n"
    )
    command = Path(sys.executable).parent / "vlrl-average"  # the console script `pip install -e .` installed
    out = subprocess.run(
        [str(command), str(tmp_path / "avg"), str(first), str(third), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "averaged 2 checkpoints" in out.stdout

    averaged = torch.load(tmp_path / "avg" / "averaged.ckpt", weights_only=True)
    sources = [torch.load(p, weights_only=True)["state_dict"] for p in (first, third)]
    assert averaged["averaged_steps"] == [1, 3]
    assert set(averaged["state_dict"]) == set(sources[0])
    for name, value in averaged["state_dict"].items():
        assert torch.equal(value, exact_mean([s[name] for s in sources])), name
    assert not torch.equal(sources[0]["model.lm_head.weight"], sources[1]["model.lm_head.weight"])
    model = generates(tmp_path / "avg" / "hf")
    assert torch.equal(model.lm_head.weight, averaged["state_dict"]["model.lm_head.weight"])


def test_sharded_checkpoint_folders_are_refused_with_the_fix(tmp_path):
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(ValueError, match="consolidate_checkpoint"):
        main([str(tmp_path / "out"), str(tmp_path / "sharded.ckpt")])
