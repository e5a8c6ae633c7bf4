"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for policies and critics.

Under Lightning's ``ModelParallelStrategy`` a method's ``configure_model`` receives a device mesh and
calls ``shard_model``: every transformer block (the classes the model lists in ``_no_split_modules``:
decoder layers and vision blocks) becomes its own FSDP unit, then the vision tower and projector, then
the root (embeddings, final norm, LM head). Parameters are all-gathered in the policy's dtype and
gradients reduce-scattered in float32. LoRA adapters (peft) are sharded with the blocks they sit in;
the root is the Hugging Face model under the peft wrapper, so ``generate`` (which peft forwards to it)
runs the root's hooks. 4-bit quantized weights cannot be sharded (bitsandbytes' packed tensors are not
DTensors): use QLoRA on one GPU, or FSDP without quantization.

For FSDP1 (Lightning's ``FSDPStrategy``, GPUs only), ``BlockWrapPolicy`` is the auto-wrap policy with
the same units: the block classes are looked up in the model when the strategy wraps it, so one config
serves every model family. Its mixed precision is set in ``configs/trainer/fsdp.yaml``: bf16 compute over
float32 flat parameters, gradients reduced in float32 (Lightning's default for ``bf16-mixed`` reduces in bf16).

Precision (``vlrl.models.precision``): the shards hold the parameters in their own dtype (float32 master
weights for a trained model), and ``shard_model`` gathers them in the compute dtype of
``trainer.precision`` (bf16 under ``bf16-mixed``).

``FSDP2Strategy`` is ``ModelParallelStrategy`` with every rank in the data-parallel (sharding)
dimension, so a config needs no arithmetic on the number of nodes and devices.

Generation: HF ``generate`` runs one forward per new token; ``gathered`` keeps every unit's parameters
gathered for the whole call (one all-gather per unit instead of one per token, and the same collectives
on every rank whatever its batch holds) and frees them after.

Checkpoints are sharded (``torch.distributed.checkpoint``): a directory per checkpoint with one file
per rank, written and read by the strategy (``save_distributed_checkpoint: false`` gathers a full
state dict on rank 0 instead). Resume with ``--ckpt_path`` pointing at the directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from vlrl.models.loading import vision_modules
from vlrl.models.value import ValueModel


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` for FSDP2 alone: parameters sharded over all ranks.

    Each rank reads its own batches (the data-parallel size is the world size) and the tensor-parallel
    size is 1; the method's ``configure_model`` shards the models with ``shard_model``.

    Args:
        save_distributed_checkpoint: ``True``: each rank writes its shard (a checkpoint is a directory);
            ``False``: the full weights and optimizer state are gathered and written by rank 0 to one file.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU (default: chosen from the device).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        # the world size is known only once the cluster environment is: every rank is data parallel
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class BlockWrapPolicy(ModuleWrapPolicy):
    """FSDP1 auto-wrap policy: one FSDP unit per transformer block (``FSDPStrategy(auto_wrap_policy=...)``).

    Args:
        class_names: Class names of the modules to wrap. Default: the blocks the model names in
            ``_no_split_modules`` (decoder layers and vision blocks), found when the strategy wraps it.
    """

    def __init__(self, class_names: list[str] | None = None) -> None:
        super().__init__(())
        self.class_names = class_names

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        self._module_classes = block_classes(root_module, self.class_names)
        self._module_classes_str = str(sorted(c.__name__ for c in self._module_classes))
        return super()._run_policy(root_module, ignored_modules, root_kwargs)


def block_classes(model: torch.nn.Module, class_names: list[str] | None = None) -> set[type[torch.nn.Module]]:
    """The classes of ``model``'s submodules named ``class_names`` (default: every ``_no_split_modules`` entry
    of the models inside it); an error if there are none."""
    names = set(class_names or ())
    if not names:
        names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(
            f"no transformer blocks to shard in {type(model).__name__}: it names none in `_no_split_modules` and "
            f"class_names={class_names!r} matches no module; list the block classes in class_names"
        )
    return found


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The dimension of ``mesh`` parameters are sharded over (FSDP2 only: tensor parallelism is not used)."""
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"trainer.strategy: tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported (vlrl "
            "shards with FSDP2 only). Set tensor_parallel_size: 1 and data_parallel_size to nodes x devices, "
            "or use vlrl.models.FSDP2Strategy (configs/trainer/fsdp2.yaml)"
        )
    return mesh["data_parallel"]


def shard_model(
    model: torch.nn.Module, mesh: DeviceMesh, dtype: torch.dtype | None = None, frozen: bool = False
) -> torch.nn.Module:
    """Apply ``fully_shard`` to the blocks, the vision tower and the model itself.

    Args:
        model: A Hugging Face model, a peft model around one, or a critic (``ValueModel``: its backbone
            is sharded like a model, then the value model, whose own parameters are the float32 head).
        mesh: The device mesh of the strategy (``LightningModule.device_mesh``).
        dtype: Dtype of the gathered parameters in forward/backward (``None``: the parameters' own).
            Gradients are reduced in float32.
        frozen: The model is never trained (a KL reference): its root frees the gathered parameters after
            each forward too (FSDP2 keeps a root's gathered for the backward that follows in training).

    Returns:
        ``model``, sharded in place (its FSDP units are ``FSDPModule`` instances).
    """
    from peft import PeftModel

    quantized = any(type(p).__name__ == "Params4bit" for p in model.parameters())
    if quantized:
        raise ValueError(
            "policy.quantization: nf4 cannot be combined with FSDP (4-bit packed weights are not shardable); "
            "remove quantization for multi-GPU runs or train on one GPU (configs/debug/qlora_1gpu.yaml)"
        )
    if isinstance(model, ValueModel):
        shard_model(model.backbone, mesh, dtype)
        fully_shard(model, mesh=sharding_mesh(mesh))  # the head keeps float32, as in the unsharded critic
        return model
    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    blocks = tuple(block_classes(hf))
    mesh = sharding_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    units = [m for m in hf.modules() if isinstance(m, blocks)]
    units += [m for m in vision_modules(hf) if not any(m is u for u in units)]
    for unit in units:  # children before their parents, as fully_shard requires
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(hf, mesh=mesh, mp_policy=policy)
    if frozen:
        hf.set_reshard_after_forward(True, recurse=False)
    return model


def is_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP1 (``FullyShardedDataParallel``) units."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def needs_synced_generation(model: torch.nn.Module) -> bool:
    """Whether ``generate`` must keep ranks in step (``synced_gpus``): under FSDP1 every forward all-gathers
    each unit, so a rank that finished decoding must go on running forwards until all have."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return False
    return is_fsdp1(model)


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    """The FSDP units inside ``model``, parents before their children (empty if it is not sharded)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module, pad_id: int) -> Iterator[None]:
    """Gather every FSDP unit of ``model`` for the block (e.g. one ``generate`` call), then free them.

    All units are all-gathered up front, in the same order on every rank, so ranks whose batches differ
    (one has images, another none; one stops decoding earlier) issue the same collectives. Then one
    forward on one token runs through the root: FSDP2 initialises its state lazily from the first unit
    that runs, and a VLM's ``generate`` may otherwise run the vision tower first. Nothing happens for an
    unsharded model.
    """
    units = fsdp_units(model)
    if not units:
        yield
        return
    nested = {id(m) for unit in units for m in unit.modules() if m is not unit}
    inner = [u for u in units if id(u) in nested]  # the root keeps its own setting (no reshard after forward)
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        ids = torch.full((1, 1), pad_id, dtype=torch.long, device=next(model.parameters()).device)  # [1, 1]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        yield
    finally:
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()
