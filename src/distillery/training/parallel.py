"""Parallelism as a function applied to an unchanged model: none, DDP, FSDP2, GPipe pipeline.

`make_strategy(name, rank=, world_size=)` returns a `Strategy`; `wrap` turns the full model
(identical on every rank, process group already initialised) into what this rank trains, and
`train_step` / `predict` / `owned_state` / `optimizer_state` hide how the work is split. The
models in `distillery.models.architectures` know nothing of this module.

Checkpoints are always keyed by the full, unwrapped model's names, so a run saved under one
strategy can be merged and read back as a plain `state_dict` (and resumed under the same one).

Pipeline micro-batches: a batch of N is cut into m equal micro-batches, where m is the largest
divisor of N that is at most `microbatches` (N = 7 gives m = 1, N = 6 with 4 asked gives m = 3).
Equal micro-batches keep GPipe's gradient (the mean of the micro-batches' mean losses) exactly
the full batch's, and let stage shapes be declared up front.
Any batch size, the last partial one included, therefore works; an awkward N only pipelines less.

Collectives (all ranks must call together): under fsdp every method but `local_*`; under ddp
`train_step`; under pipeline `train_step` and `predict`. Everything else is local.
Data parallel: each rank passes its own share of the batch and gets back that share's mean loss;
BatchNorm running statistics stay per rank (each sees only its share); checkpoints hold rank 0's.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from distillery.errors import UserError
from distillery.training.loop import optimizer_step
from distillery.training.losses import LossFn

STRATEGIES = ("none", "ddp", "fsdp", "pipeline")


class Strategy(Protocol):
    """How one rank trains its part of a model. See the module docstring for collectives."""

    name: str

    def wrap(self, model: nn.Module, spec: dict) -> nn.Module: ...
    def train_step(self, model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn,
                   opt: torch.optim.Optimizer) -> float | None: ...
    def predict(self, model: nn.Module, x: Tensor) -> Tensor | None: ...
    def owned_state(self, model: nn.Module) -> dict[str, Tensor] | None: ...
    def load_owned_state(self, model: nn.Module, state: dict[str, Tensor]) -> None: ...
    def optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None: ...
    def load_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None: ...
    def local_parameter_names(self, model: nn.Module) -> set[str]: ...
    def local_numel(self, model: nn.Module) -> int: ...


def make_strategy(name: str, *, rank: int, world_size: int, microbatches: int = 4) -> Strategy:
    """The strategy `name` for this rank; a bad name or layout is a UserError."""
    if name not in STRATEGIES:
        raise UserError(f"unknown parallel strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of {world_size}")
    if name == "none" and world_size != 1:
        raise UserError(f"strategy 'none' trains on one worker, got world_size={world_size} (use ddp)")
    if microbatches < 1:
        raise UserError(f"microbatches must be >= 1, got {microbatches}")
    if name == "pipeline":
        return Pipeline(rank, world_size, microbatches)
    if name == "fsdp":
        return FSDP(rank, world_size)
    return Replicated(name, rank)


# ---------------------------------------------------------------- model anatomy


def stage_layers(model: nn.Module, spec: dict) -> list[tuple[str, nn.Module]]:
    """The model as ordered `(full-name prefix, module)` pieces whose composition is its forward.

    cnn: its named children (conv1, relu1, ..., fc2); resnet: stem, each block "stages.i", pool, fc.
    """
    kind = spec.get("kind")
    if kind == "cnn":
        return list(model.named_children())
    if kind == "resnet":
        blocks = [(f"stages.{i}", block) for i, block in enumerate(model.stages)]
        return [("stem", model.stem), *blocks, ("pool", model.pool), ("fc", model.fc)]
    raise UserError(f"cannot split a model of kind {kind!r} into layers")


def split_points(spec: dict, num_stages: int, model: nn.Module) -> list[int]:
    """Where to cut `stage_layers(model, spec)` into `num_stages` contiguous, non-empty stages.

    Returns the `num_stages - 1` increasing cut indices c: stage s is layers[b[s]:b[s+1]] with
    b = [0, *c, len(layers)]. The cuts minimise the largest stage's MACs (one image, torch's
    flop counter); among equally balanced cuts, the one sending the fewest activation values.
    """
    layers = stage_layers(model, spec)
    if not 1 <= num_stages <= len(layers):
        raise UserError(f"cannot cut {len(layers)} layers into {num_stages} pipeline stages")
    macs, shapes = _profile(layers, spec["in_shape"])
    sent = [_numel(s) for s in shapes]  # values crossing a cut placed after layer i
    return _balanced_cuts(macs, sent, num_stages)


@torch.no_grad()
def _profile(layers: list[tuple[str, nn.Module]], in_shape: list[int]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Per layer: MACs on one image and the per-image output shape (eval mode, modes restored)."""
    device = next((p.device for _, layer in layers for p in layer.parameters()), torch.device("cpu"))
    macs, shapes, x = [], [], torch.zeros(1, *in_shape, device=device)
    for _, layer in layers:
        was_training = layer.training
        layer.eval()  # BN in train mode would update running stats (and fail on 1x1 maps)
        with FlopCounterMode(display=False) as counter:
            x = layer(x)
        layer.train(was_training)
        macs.append(counter.get_total_flops() // 2)
        shapes.append(tuple(x.shape[1:]))
    return macs, shapes


def _balanced_cuts(cost: list[int], sent: list[int], stages: int) -> list[int]:
    """Linear partition by dynamic programming: best[s][j] scores layers[:j] in s stages as
    (largest stage cost, total values sent), compared lexicographically."""
    n, prefix = len(cost), [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0, 0)
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):  # the last stage is layers[i:j]
                prev = best[s - 1][i]
                score = (max(prev[0], prefix[j] - prefix[i]), prev[1] + (sent[i - 1] if i else 0))
                if score < best[s][j]:
                    best[s][j], cut[s][j] = score, i
    cuts, j = [], n
    for s in range(stages, 1, -1):
        j = cut[s][j]
        cuts.append(j)
    return cuts[::-1]


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


# ---------------------------------------------------------------- helpers shared by strategies


@torch.no_grad()
def _eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode logits [N, K] of x [N, C, H, W]; the module's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies, so later training cannot change a checkpoint being written."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _dcp():
    """torch.distributed.checkpoint's state-dict helpers. Imported on use, like FSDP and
    pipelining below: they pull in torch.distributed.tensor (~1 s), which most runs never need."""
    from torch.distributed.checkpoint import state_dict as dcp_sd
    return dcp_sd


def _local_optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by `model`'s parameter names instead of opaque integer ids."""
    dcp_sd = _dcp()
    return copy.deepcopy(dcp_sd.get_optimizer_state_dict(model, opt, options=dcp_sd.StateDictOptions()))


def _load_local_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    dcp_sd = _dcp()
    # DCP first initialises an empty optimizer with a zero step, unless grads already exist.
    opt.zero_grad(set_to_none=True)
    dcp_sd.set_optimizer_state_dict(model, opt, copy.deepcopy(state), options=dcp_sd.StateDictOptions())


# ---------------------------------------------------------------- none and DDP


class Replicated:
    """A whole model per rank: "none" (one process, no process group) or "ddp", which averages
    gradients across ranks in backward (each rank: its share of the batch). `predict` runs the
    local model: no collective, any rank may call it alone."""

    def __init__(self, name: str, rank: int):
        self.name, self.rank = name, rank

    def wrap(self, model: nn.Module, spec: dict) -> nn.Module:
        if self.name != "ddp":
            return model
        device = _device(model)  # DDP takes device_ids on a GPU and none on the CPU
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def train_step(self, model, x, target, loss_fn, opt) -> float:
        model.train()  # DDP/FSDP average the grads across ranks inside backward
        return optimizer_step(model, x, target, loss_fn, opt)

    def predict(self, model, x) -> Tensor:
        return _eval_forward(self.unwrap(model), x)

    def owned_state(self, model) -> dict[str, Tensor] | None:
        return _cpu_copy(self.unwrap(model).state_dict()) if self.rank == 0 else None

    def load_owned_state(self, model, state) -> None:
        self.unwrap(model).load_state_dict(state)

    def optimizer_state(self, model, opt) -> dict | None:
        return _local_optim_state(self.unwrap(model), opt) if self.rank == 0 else None

    def load_optimizer_state(self, model, opt, state) -> None:
        """Every rank is given rank 0's dict (the replicas are identical)."""
        _load_local_optim_state(self.unwrap(model), opt, state)

    def local_parameter_names(self, model) -> set[str]:
        return {n for n, _ in self.unwrap(model).named_parameters()}

    def local_numel(self, model) -> int:
        return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- FSDP2


class FSDP:
    """FSDP2: every parameter-holding piece of `stage_layers` and the root are `fully_shard`ed
    over all ranks (dim-0 shards); each rank feeds its share of the batch and reduce-scatter
    averages the grads. All methods but `local_*` are collectives."""

    name = "fsdp"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def wrap(self, model: nn.Module, spec: dict) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(_device(model).type, (self.world_size,))
        # Inner units first, root last: the root then owns only what no block claimed, and each
        # block's all-gather is freed right after its forward (reshard_after_forward default).
        for _, layer in stage_layers(model, spec):
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def train_step(self, model, x, target, loss_fn, opt) -> float:
        model.train()  # DDP/FSDP average the grads across ranks inside backward
        return optimizer_step(model, x, target, loss_fn, opt)

    def predict(self, model, x) -> Tensor:
        return _eval_forward(model, x)

    def owned_state(self, model) -> dict[str, Tensor] | None:
        dcp_sd = _dcp()
        # Gathered to rank 0 only (cpu_offload=True); the other ranks get {} back.
        opts = dcp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dcp_sd.get_model_state_dict(model, options=opts)
        return _cpu_copy(state) if self.rank == 0 else None

    def load_owned_state(self, model, state) -> None:
        dcp_sd = _dcp()
        # Every rank holds the full dict, so each cuts out its own shard: no broadcast needed.
        dcp_sd.set_model_state_dict(model, state, options=dcp_sd.StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model, opt) -> dict | None:
        dcp_sd = _dcp()
        opts = dcp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dcp_sd.get_optimizer_state_dict(model, opt, options=opts)
        return copy.deepcopy(state) if self.rank == 0 else None

    def load_optimizer_state(self, model, opt, state) -> None:
        """Every rank is given rank 0's full dict and keeps its own shard of each tensor."""
        if not state["state"]:
            # A stateless optimizer (SGD without momentum) has only hyper-parameters, nothing to
            # shard; DCP's full-state path would fail on it ("Expected device to be set").
            _load_local_optim_state(model, opt, state)
            return
        dcp_sd = _dcp()
        opt.zero_grad(set_to_none=True)  # else DCP skips initialising an empty optimizer
        dcp_sd.set_optimizer_state_dict(model, opt, copy.deepcopy(state),
                                        options=dcp_sd.StateDictOptions(full_state_dict=True))

    def local_parameter_names(self, model) -> set[str]:
        """Every name: FSDP keeps the module tree and shards each parameter (see `local_numel`)."""
        return {n for n, _ in model.named_parameters()}

    def local_numel(self, model) -> int:
        """Parameter elements stored on this rank: the sum of the local DTensor shards."""
        return sum(_local(p).numel() for p in model.parameters())


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


# ---------------------------------------------------------------- GPipe pipeline


class PipelineStageModule(nn.Sequential):
    """One rank's contiguous slice of `stage_layers`, children numbered 0..k-1.

    Child i is `full_prefixes[i]` in the full model. `in_shape`/`out_shape` are per-image
    activation shapes ([C, H, W] in, [K] out of the last stage), known from the full model at
    wrap time so that stage shapes can be declared statically (no metadata exchange).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        super().__init__(*[m for _, m in layers])
        self.full_prefixes = [name for name, _ in layers]
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        # (micro-batches, micro-batch size, dtype, training) -> ScheduleGPipe; filled lazily.
        self.schedules: dict[tuple, Any] = {}
        self.loss_fn: LossFn | None = None  # the current train_step's loss (see Pipeline._schedule)

    def full_name(self, local: str) -> str:
        """'3.conv1.weight' -> 'stages.1.conv1.weight' (child 3 is stages.1)."""
        index, _, rest = local.partition(".")
        prefix = self.full_prefixes[int(index)]
        return f"{prefix}.{rest}" if rest else prefix


class Pipeline:
    """GPipe over `world_size` ranks, stage r on rank r, cut by `split_points`.

    Every rank calls `train_step`/`predict` with the same batch (stage 0 reads x, the last stage
    reads target; the others use only its size). See the module docstring for micro-batching.
    """

    name = "pipeline"

    def __init__(self, rank: int, world_size: int, microbatches: int):
        self.rank, self.world_size, self.microbatches = rank, world_size, microbatches

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def wrap(self, model: nn.Module, spec: dict) -> PipelineStageModule:
        layers = stage_layers(model, spec)
        bounds = [0, *split_points(spec, self.world_size, model), len(layers)]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        _, shapes = _profile(layers, spec["in_shape"])
        in_shape = tuple(spec["in_shape"]) if lo == 0 else shapes[lo - 1]
        return PipelineStageModule(layers[lo:hi], in_shape, shapes[hi - 1])

    def train_step(self, model, x, target, loss_fn, opt) -> float | None:
        """One GPipe step on the whole batch x [N, ...], target [N, ...] (any dtype/shape)."""
        model.train()
        schedule = self._schedule(model, x, training=True)
        model.loss_fn = loss_fn
        opt.zero_grad(set_to_none=True)  # GPipe accumulates micro-batch grads into .grad
        losses: list[Tensor] = []
        schedule.step(*self._inputs(x), target=target if self.is_last else None,
                      losses=losses if self.is_last else None)
        opt.step()
        # Equal micro-batches: the mean of their mean losses is the batch's mean loss.
        return torch.stack(losses).mean().item() if self.is_last else None

    @torch.no_grad()
    def predict(self, model, x) -> Tensor | None:
        """Eval-mode logits [N, K] on the last stage, None elsewhere (forward-only schedule)."""
        was_training = model.training
        model.eval()
        try:
            return self._schedule(model, x, training=False).step(*self._inputs(x))
        finally:
            model.train(was_training)

    def _inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) if self.rank == 0 else ()

    def _schedule(self, model: PipelineStageModule, x: Tensor, *, training: bool):
        """The cached schedule for this batch size: one per shape, because a PipelineStage
        allocates its receive buffers for fixed micro-batch shapes on first use."""
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        n = x.shape[0]
        m = microbatch_count(n, self.microbatches)
        key = (m, n // m, x.dtype, training)
        if key not in model.schedules:
            # Declared shapes make the stage STATIC: no metadata objects are exchanged. Their
            # requires_grad is what tells torch which gradients travel back between stages.
            size, grads_in = n // m, training and self.rank > 0
            stage = PipelineStage(
                model, stage_index=self.rank, num_stages=self.world_size, device=x.device,
                input_args=torch.empty(size, *model.in_shape, dtype=x.dtype, requires_grad=grads_in, device=x.device),
                output_args=torch.empty(size, *model.out_shape, dtype=x.dtype, requires_grad=training, device=x.device))
            # A loss makes GPipe run backward; it reads the module's current loss so that a new
            # loss_fn per call (e.g. per epoch) reuses the schedule. GPipe sums the micro-batches'
            # backward, then scale_grads=True divides every grad by m (perform_reduce_grad): with
            # a mean loss on equal micro-batches, exactly the full batch's mean-loss gradient.
            # No loss: forward only, and scale_grads=False so predict never touches leftover grads.
            loss = (lambda out, tgt: model.loss_fn(out, tgt)) if training else None
            model.schedules[key] = ScheduleGPipe(stage, n_microbatches=m, loss_fn=loss, scale_grads=training)
        return model.schedules[key]

    def owned_state(self, model) -> dict[str, Tensor]:
        """This stage's parameters and buffers under full-model names (every rank returns one)."""
        return {model.full_name(k): v for k, v in _cpu_copy(model.state_dict()).items()}

    def load_owned_state(self, model, state) -> None:
        """Load this stage's entries from the merged full-model dict (strict on the stage's keys)."""
        model.load_state_dict({k: state[model.full_name(k)] for k in model.state_dict()})

    def optimizer_state(self, model, opt) -> dict:
        """This rank's own optimizer state, parameters named as in the full model."""
        state = _local_optim_state(model, opt)
        return _rename_optim(state, {k: model.full_name(k) for k, _ in model.named_parameters()})

    def load_optimizer_state(self, model, opt, state) -> None:
        """`state` is this rank's own dict, as returned by `optimizer_state` on this rank."""
        back = {model.full_name(k): k for k, _ in model.named_parameters()}
        _load_local_optim_state(model, opt, _rename_optim(state, back))

    def local_parameter_names(self, model) -> set[str]:
        return {model.full_name(n) for n, _ in model.named_parameters()}

    def local_numel(self, model) -> int:
        return sum(p.numel() for p in model.parameters())


def microbatch_count(n: int, wanted: int) -> int:
    """The largest divisor of batch size n that is at most `wanted`: equal micro-batches."""
    return next(m for m in range(min(wanted, n), 0, -1) if n % m == 0)


def _rename_optim(state: dict, names: dict[str, str]) -> dict:
    """An FQN-keyed optimizer state dict ({"state": {fqn: ...}, "param_groups": [{"params": [fqn]}]})
    with every parameter name mapped through `names`."""
    groups = [{**g, "params": [names[p] for p in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[k]: v for k, v in state["state"].items()}, "param_groups": groups}
