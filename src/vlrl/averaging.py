"""Uniform checkpoint averaging, the Hugging Face export of a trained model, and ``vlrl-average``.

The average of ``k`` checkpoints is, tensor by tensor, ``(x_1 + ... + x_k) / k`` computed in
float64 and cast back to the tensor's dtype (integer tensors must agree and are kept). During
training, ``vlrl.callbacks.CheckpointAveraging`` averages snapshots it takes itself; this module's
``vlrl-average`` command averages Lightning checkpoint files that already exist::

    vlrl-average OUT_DIR CKPT1 CKPT2 [...] [--config CONFIG.yaml]

It writes ``OUT_DIR/averaged.ckpt`` (a weights-only Lightning checkpoint: ``lightning-cli test
--ckpt_path`` or ``fit --ckpt_path`` of a new run load it) and, given the run's config (the YAML it
was trained with, or the ``config.yaml`` LightningCLI saved next to its logs), ``OUT_DIR/hf/``: a
Hugging Face model directory (weights, config, generation config, processor/tokenizer files) that
``from_pretrained`` and ``vllm serve`` load. The config names the method and its policy, which
gives the model's architecture and processor; any vlrl method (they all keep the trained model at
``module.model`` and its processor at ``module.processor``) works.

LoRA: the adapter tensors (``lora_A``, ``lora_B``) are averaged like any other tensor; the HF
export merges the averaged adapter into the base weights, so ``hf/`` is a plain model that needs no
peft to load or serve. (Averaging the two factors separately is not the same as averaging the
products ``B·A``; for snapshots of one run, which stay close, the difference is small.)

Sharded runs: checkpoints must hold the full state dict (Lightning's ``FSDPStrategy(state_dict_type="full")``
or ``ModelParallelStrategy(save_distributed_checkpoint=False)``); a sharded checkpoint folder is
refused with the command that consolidates it.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from peft import PeftModel, get_peft_model

CKPT_NAME = "averaged.ckpt"
HF_SUBDIR = "hf"


def average_tensors(tensors: Sequence[torch.Tensor], name: str = "tensor") -> torch.Tensor:
    """The element-wise mean of same-shaped tensors, computed in float64, in the first one's dtype.

    >>> average_tensors([torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])])
    tensor([1.5000, 3.0000])
    """
    first = tensors[0]
    for other in tensors[1:]:
        if other.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(first.shape)} in one checkpoint and {tuple(other.shape)} in another"
            )
    if not first.is_floating_point():
        if any(not torch.equal(other, first) for other in tensors[1:]):
            raise ValueError(f"{name} is an integer tensor that differs between checkpoints; it cannot be averaged")
        return first.clone()
    total = torch.zeros(first.shape, dtype=torch.float64)
    for tensor in tensors:
        total += tensor.to(device="cpu", dtype=torch.float64)
    return (total / len(tensors)).to(first.dtype)


def average_state_dicts(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The uniform average of state dicts with the same keys; non-tensor entries come from the last one."""
    if not state_dicts:
        raise ValueError("nothing to average: no checkpoints were given")
    keys = list(state_dicts[0])
    for i, other in enumerate(state_dicts[1:], start=2):
        if set(other) != set(keys):
            extra, missing = sorted(set(other) - set(keys)), sorted(set(keys) - set(other))
            raise ValueError(
                f"checkpoint {i} does not hold the same tensors as checkpoint 1 (extra: {extra[:5]}, missing: "
                f"{missing[:5]}); average checkpoints of one run"
            )
    out = {}
    for key in keys:
        values = [sd[key] for sd in state_dicts]
        out[key] = average_tensors(values, key) if isinstance(values[0], torch.Tensor) else values[-1]
    return out


def load_weights(path: str | Path) -> dict[str, Any]:
    """A checkpoint file memory-mapped on CPU (tensors are read when used)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder: a sharded (distributed) checkpoint. Average full-state checkpoints: consolidate "
            f"it first with `python -m lightning.pytorch.utilities.consolidate_checkpoint {path}` (FSDP), or save "
            "full checkpoints (FSDPStrategy(state_dict_type='full'), ModelParallelStrategy(save_distributed_checkpoint=False))"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def export_hf(model: torch.nn.Module, processor: Any, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``model``'s architecture with the weights ``state`` as a Hugging Face model directory.

    ``state`` holds every tensor of ``model.state_dict()`` (same keys). The live ``model`` is not
    touched: the weights go into a copy built on the meta device, so nothing is duplicated on the
    accelerator. A LoRA model (peft) is written merged, as a plain model.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(base.config, "quantization_config", None) is not None:
        raise ValueError(
            "cannot export a quantized (QLoRA) model as merged weights; export the adapter with "
            "`model.save_pretrained(...)` or train with `policy.quantization: null`"
        )
    with torch.device("meta"):
        skeleton = type(base)._from_config(copy.deepcopy(base.config), dtype=base.dtype)
    if isinstance(model, PeftModel):
        skeleton = get_peft_model(skeleton, copy.deepcopy(model.peft_config[model.active_adapter]))
    skeleton.load_state_dict(dict(state), strict=True, assign=True)
    if isinstance(skeleton, PeftModel):
        skeleton = skeleton.merge_and_unload()
    skeleton.generation_config = copy.deepcopy(base.generation_config)
    out = Path(out_dir)
    skeleton.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def lightning_checkpoint(
    state_dict: dict[str, torch.Tensor], steps: list[int], sources: list[str], last: Mapping[str, Any]
) -> dict[str, Any]:
    """A weights-only Lightning checkpoint of averaged weights (no optimizer or loop state).

    Args:
        state_dict: The module's state dict with the averaged tensors.
        steps: The global steps of the averaged checkpoints.
        sources: Where the averaged checkpoints were (files or snapshots).
        last: ``epoch``, ``global_step`` and ``pytorch-lightning_version`` to record (e.g. the last checkpoint's).
    """
    return {
        "state_dict": state_dict,
        "epoch": int(last.get("epoch", 0)),
        "global_step": int(last.get("global_step", max(steps, default=0))),
        "pytorch-lightning_version": last.get("pytorch-lightning_version", pl.__version__),
        "averaged_steps": list(steps),
        "averaged_from": list(sources),
    }


def module_from_config(path: str | Path) -> pl.LightningModule:
    """The method a LightningCLI config's ``model`` section describes, instantiated (weights not loaded)."""
    import yaml
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path} has no `model` section; give the YAML the run was trained with")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    parsed = parser.parse_object({"model": config["model"]})
    return parser.instantiate_classes(parsed).model


def model_state(module_state: Mapping[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The entries of a LightningModule state dict that belong to ``module.model``, without the prefix."""
    return {k[len(prefix) :]: v for k, v in module_state.items() if k.startswith(prefix)}


def average_files(out_dir: str | Path, checkpoints: Sequence[str | Path], config: str | Path | None = None) -> Path:
    """Average Lightning checkpoint files into ``out_dir`` (see the module docstring); returns ``out_dir``."""
    out = Path(out_dir)
    loaded = [load_weights(p) for p in checkpoints]
    for path, ckpt in zip(checkpoints, loaded, strict=True):
        if "state_dict" not in ckpt:
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict'); give .ckpt files of a vlrl run")
    averaged = average_state_dicts([c["state_dict"] for c in loaded])
    steps = [int(c.get("global_step", 0)) for c in loaded]
    out.mkdir(parents=True, exist_ok=True)
    torch.save(lightning_checkpoint(averaged, steps, [str(p) for p in checkpoints], loaded[-1]), out / CKPT_NAME)
    if config is not None:
        module = module_from_config(config)
        module.configure_model()
        export_hf(module.model, module.processor, model_state(averaged), out / HF_SUBDIR)
    return out


def main(argv: list[str] | None = None) -> None:
    """Average Lightning checkpoints of one vlrl run uniformly (``vlrl-average``)."""
    parser = argparse.ArgumentParser(
        prog="vlrl-average",
        description="Average Lightning checkpoints of one run uniformly. Writes OUT_DIR/averaged.ckpt and, with "
        "--config, the Hugging Face model directory OUT_DIR/hf (loadable with from_pretrained, servable by vLLM).",
    )
    parser.add_argument("out_dir", type=Path, help="output folder")
    parser.add_argument("checkpoints", nargs="+", type=Path, help="Lightning .ckpt files (full state; one converts it)")
    parser.add_argument("--config", type=Path, help="the run's LightningCLI YAML, needed for the Hugging Face export")
    args = parser.parse_args(argv)
    out = average_files(args.out_dir, args.checkpoints, args.config)
    print(f"averaged {len(args.checkpoints)} checkpoints -> {out / CKPT_NAME}")
    if args.config is not None:
        print(f"Hugging Face model -> {out / HF_SUBDIR}")


if __name__ == "__main__":
    main()
