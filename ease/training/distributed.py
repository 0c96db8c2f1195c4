"""Training on several processes with PyTorch's own engine: torchrun, DDP and FSDP2.

The :class:`~ease.training.Trainer` uses this module when a script is launched with
``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``); the script itself
does not change. What happens, and why:

- :func:`setup_distributed` joins the process group (NCCL on CUDA, Gloo on the CPU) and
  picks the device of this rank (``cuda:LOCAL_RANK`` or the CPU).
- :func:`wrap_model` wraps the decoder in DDP, or shards it with FSDP2
  (``fully_shard`` on every block, then on the root). Both wrap a small
  :class:`_ForwardRunner` module, not the decoder: the trainer runs *any* function of the
  decoder (its loss, however it is computed) inside the runner's ``forward``, so DDP's
  gradient hooks and FSDP's all-gathers wrap it whether it calls ``forward``,
  ``hidden_states`` or ``exit_head``. Per-layer parameter groups are still built from
  ``model.layers[l - 1]``: FSDP2 replaces parameters in place on the same modules.
- A batch is the *global* batch: every rank sees it whole and :func:`shard_rows` gives
  each rank a contiguous slice of its rows. The loss of a step is the global token mean,
  ``sum_l w_l * sum_ranks CE_sum_l / N_global``; since DDP and FSDP average gradients over
  ranks, each rank back-propagates its share multiplied by ``world_size`` (see
  :func:`loss_scale`), and the gradient equals the single-process gradient whatever the
  number of ranks, the split of rows or the ignored targets.
- :func:`full_model_state_dict` / :func:`load_full_model_state_dict` (and the optimiser
  pair) move full, unsharded state dicts through rank 0, so checkpoints and the
  early-stopping copy are the same files on one process or many.

Layers are numbered from 1 everywhere, as in the rest of the framework.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DISTRIBUTED_MODES",
    "DistributedContext",
    "WrappedModel",
    "all_gather_objects",
    "all_reduce_sum",
    "broadcast_object",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "has_distributed_sampler",
    "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
    "loss_scale",
    "reduce_grad_norm",
    "set_sampler_epoch",
    "setup_distributed",
    "shard_rows",
    "torchrun_environment",
    "uses_dtensors",
    "wrap_model",
    "wrapped_model",
]

DISTRIBUTED_MODES = ("auto", "ddp", "fsdp", "none")
"""Values of ``TrainingConfig.distributed``: ``"auto"`` is DDP under torchrun, else ``"none"``."""

_TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def _fsdp():
    """``(fully_shard, FSDPModule)``: public in torch >= 2.6, under ``_composable`` before."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


def _is_dtensor(tensor: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch 2.5
        from torch.distributed._tensor import DTensor
    return isinstance(tensor, DTensor)


# --------------------------------------------------------------------------- launch


def torchrun_environment() -> tuple[int, int, int] | None:
    """``(world_size, rank, local_rank)`` from the variables torchrun sets, or ``None``.

    Raises:
        ValueError: some but not all of ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` are set,
            or one is not a valid integer.
    """
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARIABLES):
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        raise ValueError(f"a torchrun launch sets {', '.join(_TORCHRUN_VARIABLES)}; {', '.join(missing)} missing")
    try:
        world_size, rank, local_rank = (int(os.environ[name]) for name in _TORCHRUN_VARIABLES)
    except ValueError as error:
        raise ValueError(f"torchrun variables must be integers: {error}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun variables WORLD_SIZE={world_size} RANK={rank} LOCAL_RANK={local_rank}")
    return world_size, rank, local_rank


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a run.

    Attributes:
        mode: ``"none"`` (one process, or independent processes), ``"ddp"`` or ``"fsdp"``.
        world_size: number of processes (1 for ``"none"``).
        rank: this process's global rank (0 for ``"none"``).
        local_rank: its rank on this machine.
        device: the device this rank trains on (``cuda:LOCAL_RANK`` or the CPU);
            ``None`` for ``"none"``, where the model stays where the user put it.
    """

    mode: str = "none"
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        """True when the model is wrapped (DDP or FSDP2) and figures are reduced over ranks."""
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """True on the rank that prints, writes checkpoints and holds full state dicts."""
        return self.rank == 0


def setup_distributed(mode: str = "auto") -> DistributedContext:
    """Join the process group of a torchrun launch, if there is one and ``mode`` asks.

    ``"auto"`` means DDP under torchrun and ``"none"`` otherwise; ``"ddp"`` and
    ``"fsdp"`` need a torchrun launch (or a process group the caller initialised
    already). The process group is initialised once per process with NCCL when CUDA is
    available, else Gloo; on CUDA the current device becomes ``cuda:LOCAL_RANK``. A
    group this function created is destroyed at interpreter exit.

    Args:
        mode: one of :data:`DISTRIBUTED_MODES`.

    Returns:
        A :class:`DistributedContext`.

    Raises:
        ValueError: an unknown mode, or ``"ddp"``/``"fsdp"`` outside a torchrun launch.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    if mode == "none":
        return DistributedContext()
    environment = torchrun_environment()
    if environment is None and not dist.is_initialized():
        if mode == "auto":
            return DistributedContext()
        raise ValueError(
            f"distributed={mode!r} needs a torchrun launch (WORLD_SIZE, RANK and LOCAL_RANK unset); "
            "run the script with `torchrun --nproc_per_node=N script.py`, or use distributed='auto'"
        )
    cuda = torch.cuda.is_available()
    if environment is not None:
        local_rank = environment[2]
        if cuda:
            # Before the process group: NCCL binds each rank to the current device.
            torch.cuda.set_device(local_rank)
    else:
        # A group the caller initialised (mp.spawn, ...): the caller chose the device too.
        local_rank = torch.cuda.current_device() if cuda else 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_destroy_process_group)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistributedContext(
        mode="ddp" if mode == "auto" else mode,
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=local_rank,
        device=device,
    )


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- wrapping


class _ForwardRunner(nn.Module):
    """The module DDP or FSDP2 wraps: runs a function of the decoder inside ``forward``.

    DDP prepares its gradient reduction, and FSDP2 all-gathers the root's parameters, only
    around a module's ``forward``. Running the trainer's loss (or an evaluation pass) as
    ``runner(fn, *args)`` puts every call it makes on the decoder (``forward``,
    ``hidden_states``, ``exit_head``, a fused head) inside that window.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def _nothing(model: nn.Module) -> None:
    return None


@dataclass
class WrappedModel:
    """A decoder as the trainer runs it: bare, under DDP, or sharded by FSDP2.

    Attributes:
        model: the user's decoder (sharded in place under FSDP2).
        runner: the DDP wrapper or the FSDP2 root around the decoder; ``None`` bare.
        mode: ``"none"``, ``"ddp"`` or ``"fsdp"``.
    """

    model: nn.Module
    runner: nn.Module | None = None
    mode: str = "none"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)``, inside the wrapper's forward when there is one."""
        if self.runner is None:
            return fn(self.model, *args)
        return self.runner(fn, *args)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) while ``enabled`` is False.

        Used for all but the last micro-batch of a step: the gradients accumulate locally
        and are reduced once.
        """
        if enabled or self.runner is None:
            yield
        elif self.mode == "ddp":
            with self.runner.no_sync():
                yield
        else:
            self.runner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.runner.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Let code call the decoder's methods directly (evaluation) under FSDP2.

        The FSDP2 root is sharded with ``reshard_after_forward=False``, so one empty pass
        through its forward all-gathers the root's own parameters (embeddings, final norm,
        head) and leaves them gathered; the blocks gather themselves in their own hooks.
        The root is resharded on exit. A no-op for DDP and bare models.
        """
        if self.mode != "fsdp":
            yield
            return
        with torch.no_grad():
            self.runner(_nothing)
        try:
            yield
        finally:
            self.runner.reshard()


def wrap_model(model: nn.Module, context: DistributedContext, find_unused_parameters: bool = False) -> WrappedModel:
    """Wrap ``model`` as ``context.mode`` asks; move it to ``context.device`` first.

    FSDP2: rank 0's weights are broadcast first (so every rank shards the same model
    even if they were initialised differently), then ``fully_shard`` is applied to each
    block and to the root with ``reshard_after_forward=False`` (the root's parameters
    (embeddings, head) are used again by every exit head, so gathering them once per
    pass is cheaper). The mesh is one-dimensional over all ranks.

    Args:
        model: an :class:`~ease.models.EarlyExitDecoder`, not wrapped yet.
        context: from :func:`setup_distributed`.
        find_unused_parameters: DDP only: set when some parameters get no gradient in a
            step (blocks above the deepest weighted layer are never run).

    Returns:
        A :class:`WrappedModel`.

    Raises:
        ValueError: ``model`` is already a DDP or FSDP module.
    """
    from torch.nn.parallel import DistributedDataParallel

    _, fsdp_module = _fsdp()
    if isinstance(model, DistributedDataParallel) or any(isinstance(m, fsdp_module) for m in model.modules()):
        raise ValueError(
            "pass the bare model: the Trainer wraps it in DDP or shards it with FSDP2 itself "
            "(TrainingConfig.distributed)"
        )
    if not context.enabled:
        return WrappedModel(model)
    model.to(context.device)
    if context.mode == "ddp":
        # The decoder's only buffers are RoPE tables derived from its config: identical on
        # every rank, so not re-broadcast at each forward (the option's name changed in torch 2.13).
        options = inspect.signature(DistributedDataParallel.__init__).parameters
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}
        runner = DistributedDataParallel(
            _ForwardRunner(model),
            device_ids=[context.device.index] if context.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **buffers,
        )
        return WrappedModel(model, runner, "ddp")

    fully_shard, _ = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    _broadcast_from_rank0(model)
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    runner = _ForwardRunner(model)
    fully_shard(runner, mesh=mesh, reshard_after_forward=False)
    return WrappedModel(model, runner, "fsdp")


# The wrapper lives on the model it wraps, so that it dies with the model: a trainer (or
# a cache keyed by id(model)) holding it would keep every model it has seen alive.
_WRAPPER_ATTRIBUTE = "_ease_distributed_wrapper"


def wrapped_model(model: nn.Module, context: DistributedContext, find_unused_parameters: bool = False) -> WrappedModel:
    """``model`` as ``context`` runs it: bare on one process, else wrapped once and reused.

    Under torchrun the first call wraps (:func:`wrap_model`) and stores the wrapper on the
    model itself; later calls return that same wrapper, so DDP's buckets and FSDP2's
    shards are built once per model, and nothing outside the model refers to it.
    """
    if not context.enabled:
        return WrappedModel(model)
    wrapped = model.__dict__.get(_WRAPPER_ATTRIBUTE)
    if wrapped is None:
        wrapped = wrap_model(model, context, find_unused_parameters)
        # Not a submodule (object.__setattr__ skips nn.Module's registration): the
        # wrapper refers back to the model, and must not appear in its state dict.
        object.__setattr__(model, _WRAPPER_ATTRIBUTE, wrapped)
    return wrapped


# --------------------------------------------------------------------------- batches


def shard_rows(
    inputs: torch.Tensor, targets: torch.Tensor, pieces: int, ignore_index: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``(inputs, targets)`` ``[B, T]`` into ``pieces`` contiguous row slices.

    Slices differ by at most one row (``torch.tensor_split``). A slice that would be
    empty (``B < pieces``) becomes one row of token 0 whose targets are all
    ``ignore_index``: it adds nothing to any loss, gradient or count, but lets every rank
    run the same number of forward and backward passes, which DDP and FSDP require.

    Returns:
        ``pieces`` pairs of ``[b_i, T]`` tensors (views where no padding was needed).
    """
    shards = []
    for part_inputs, part_targets in zip(inputs.tensor_split(pieces), targets.tensor_split(pieces)):
        if part_inputs.shape[0] == 0:
            part_inputs = inputs.new_zeros((1, inputs.shape[1]))
            part_targets = targets.new_full((1, targets.shape[1]), ignore_index)
        shards.append((part_inputs, part_targets))
    return shards


def has_distributed_sampler(batches: Iterable[Any]) -> bool:
    """True for a ``DataLoader`` whose sampler is a ``DistributedSampler``.

    Such a loader already gives each rank its own rows, so the trainer uses its batches
    as they are instead of slicing them.
    """
    from torch.utils.data.distributed import DistributedSampler

    return any(isinstance(sampler, DistributedSampler) for sampler in _samplers(batches))


def _samplers(batches: Iterable[Any]) -> list[Any]:
    # A DataLoader's sampler, and the one inside its batch sampler; none for a list.
    return [getattr(batches, "sampler", None), getattr(getattr(batches, "batch_sampler", None), "sampler", None)]


def loss_scale(local_tokens: int, global_tokens: int, world_size: int) -> float:
    """Factor that turns a rank's token-mean loss into its share of the global gradient.

    A rank's loss is ``L_r = CE_sum_r / n_r`` (its own token mean). The global loss is
    ``sum_r CE_sum_r / N``; DDP and FSDP average gradients over ranks, so each rank
    back-propagates ``L_r * n_r * world_size / N``. With one rank and one micro-batch the
    factor is exactly 1.
    """
    return local_tokens * world_size / max(global_tokens, 1)


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (on ``context.device``); returned as given otherwise."""
    if not context.enabled:
        return tensor
    moved = tensor.to(context.device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def all_gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` on one process."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.enabled:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- full state dicts


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tensors sharing storage (a tied embedding and head) stay shared in the copy, so a
    # tied model's snapshot costs one embedding, as in the model.
    copies: dict[tuple, torch.Tensor] = {}
    result = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        result[name] = copies[key]
    return result


def _dcp_options(context: DistributedContext, loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not context.enabled:
        return StateDictOptions(full_state_dict=True)
    if loading:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module, context: DistributedContext) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict as a CPU copy on rank 0; ``{}`` on the others.

    Collective under DDP and FSDP2: every rank must call it. Keys are the bare decoder's
    (``layers.0.attention.qkv_proj.weight``), whatever the wrapping, so the result loads
    into a model on one process.
    """
    if context.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_dcp_options(context))
        return _cpu_copy(state) if context.is_main else {}
    # DDP replicas are identical: rank 0's own weights are the full state, no communication.
    return _cpu_copy(model.state_dict()) if context.is_main else {}


def load_full_model_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], context: DistributedContext
) -> None:
    """Load a full state dict held by rank 0 into every rank's model (collective).

    Ranks other than 0 may pass ``{}``. Under FSDP2 rank 0's tensors are broadcast and
    each rank keeps its shard; under DDP rank 0 loads and broadcasts its parameters.
    ``state`` itself is not modified.
    """
    if context.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # dict(): set_model_state_dict replaces the values of the dict it is given.
        set_model_state_dict(model, dict(state) if context.is_main else {}, options=_dcp_options(context, True))
        return
    if context.is_main or not context.enabled:
        model.load_state_dict(state)
    if context.enabled:
        _broadcast_from_rank0(model)


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's, in place."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, context: DistributedContext
) -> dict[str, Any]:
    """The optimiser's full state dict, keyed by parameter names, on rank 0 (collective).

    Uses ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``: parameter
    names instead of positions make the dict load under any wrapping and any world size.
    Other ranks get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_dcp_options(context))
    if context.enabled and not context.is_main:
        return {}
    # A copy: on the CPU the returned tensors may be the optimiser's own, which keep changing.
    return copy.deepcopy(state)


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any], context: DistributedContext
) -> None:
    """Load :func:`full_optimizer_state_dict`'s result (held by rank 0) on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    given = dict(state) if (context.is_main or not context.enabled) else {}
    set_optimizer_state_dict(model, optimizer, given, options=_dcp_options(context, True))


def reduce_grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """The global gradient norm as a plain tensor (FSDP2's clip returns a replicated DTensor)."""
    return norm.full_tensor() if _is_dtensor(norm) else norm


def uses_dtensors(parameters: Sequence[torch.Tensor]) -> bool:
    """True when any parameter is an FSDP2 shard (a ``DTensor``)."""
    return any(_is_dtensor(p) for p in parameters)


def set_sampler_epoch(batches: Iterable[Any], epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a ``DataLoader``'s sampler when it has one.

    A ``DistributedSampler`` shuffles with ``seed + epoch``: without this every epoch
    would see the same order, and a resumed run could not reproduce it.
    """
    for sampler in _samplers(batches):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return
