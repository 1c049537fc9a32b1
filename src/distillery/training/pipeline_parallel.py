"""GPipe pipeline parallelism: the model cut into one stage per rank, balanced by MACs.

Micro-batches: a batch of N is cut into m equal micro-batches, where m is the largest divisor
of N that is at most `microbatches` (N = 7 gives m = 1, N = 6 with 4 asked gives m = 3). Equal
micro-batches keep GPipe's gradient (the mean of the micro-batches' mean losses) exactly the
full batch's, and let stage shapes be declared up front.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from distillery.core.errors import UserError
from distillery.models.architectures import stage_layers
from distillery.training.losses import LossFn
from distillery.training.model_state import cpu_copy, load_local_optim_state, local_optim_state


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
def _profile(layers: list[tuple[str, nn.Module]],
             in_shape: list[int]) -> tuple[list[int], list[tuple[int, ...]]]:
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


class PipelineStageModule(nn.Sequential):
    """One rank's contiguous slice of `stage_layers`, children numbered 0..k-1.

    Child i is `full_prefixes[i]` in the full model. `in_shape`/`out_shape` are per-image
    activation shapes ([C, H, W] in, [K] out of the last stage), known from the full model at
    wrap time so that stage shapes can be declared statically (no metadata exchange).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...]):
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

    def current_loss(self, out: Tensor, target: Tensor) -> Tensor:
        """`loss_fn` as it is when GPipe calls: a schedule outlives the train_step that made it."""
        assert self.loss_fn is not None  # train_step sets it before it runs a training schedule
        return self.loss_fn(out, target)


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
                input_args=torch.empty(size, *model.in_shape, dtype=x.dtype, requires_grad=grads_in,
                                       device=x.device),
                output_args=torch.empty(size, *model.out_shape, dtype=x.dtype, requires_grad=training,
                                        device=x.device))
            # A loss makes GPipe run backward; it reads the module's current loss so that a new
            # loss_fn per call (e.g. per epoch) reuses the schedule. GPipe sums the micro-batches'
            # backward, then scale_grads=True divides every grad by m (perform_reduce_grad): with
            # a mean loss on equal micro-batches, exactly the full batch's mean-loss gradient.
            # No loss: forward only, and scale_grads=False so predict never touches leftover grads.
            loss = model.current_loss if training else None
            model.schedules[key] = ScheduleGPipe(stage, n_microbatches=m, loss_fn=loss, scale_grads=training)
        return model.schedules[key]

    def owned_state(self, model) -> dict[str, Tensor]:
        """This stage's parameters and buffers under full-model names (every rank returns one)."""
        return {model.full_name(k): v for k, v in cpu_copy(model.state_dict()).items()}

    def load_owned_state(self, model, state) -> None:
        """Load this stage's entries from the merged full-model dict (strict on the stage's keys)."""
        model.load_state_dict({k: state[model.full_name(k)] for k in model.state_dict()})

    def optimizer_state(self, model, opt) -> dict:
        """This rank's own optimizer state, parameters named as in the full model."""
        state = local_optim_state(model, opt)
        return _rename_optim(state, {k: model.full_name(k) for k, _ in model.named_parameters()})

    def load_optimizer_state(self, model, opt, state) -> None:
        """`state` is this rank's own dict, as returned by `optimizer_state` on this rank."""
        back = {model.full_name(k): k for k, _ in model.named_parameters()}
        load_local_optim_state(model, opt, _rename_optim(state, back))

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
