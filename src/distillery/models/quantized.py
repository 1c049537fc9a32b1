"""A model's quantized forms (torchao): made by compression's steps, rebuilt by `artifacts`.

int8_dynamic and weight_only use torchao's `quantize_` on linear layers: deterministic from
the weights, so a saved variant is rebuilt by applying the same config to a fresh model and
loading torchao's flattened tensors.

int8_static quantizes the whole network with torchao's PT2E flow (export -> prepare with the
x86 inductor quantizer -> calibrate -> convert). Its calibration is data-dependent, so what
makes it reproducible is recorded: every observer's quantization parameters (`QParams`). A
fresh process exports the same model, prepares it, swaps each observer for a
`FrozenQParams` holding the recorded values and converts: the same graph with the same
scales, without the calibration data. Weights are stored as the int8 values convert makes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Protocol, cast

# torchao registers enums with torch's pytree on import, and torch answers each with a
# deprecation warning; on a CPU build torchao also warns that its CUDA kernels did not load.
# Neither is actionable here, and both would print in every Ray worker.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("torchao").setLevel(logging.ERROR)
# torch's, on deepcopy of an export
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
# inductor int8 lowering
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)

import torch  # noqa: E402 (after the filters above: torchao warns on import)
from torch import nn  # noqa: E402
from torch.fx import GraphModule  # noqa: E402
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup
from torchao.quantization.pt2e import ObserverBase, allow_exported_model_train_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

from distillery.config.compress import WeightOnly
from distillery.core.errors import UserError

QParams = dict[str, dict[str, Any]]  # observer name -> {scale, zero_point, dtype, qscheme, ...}
MAX_BATCH = 65_536


# ---------------------------------------------------------------- torchao quantize_


def torchao_config(step) -> Any:
    """The torchao config of an `int8_dynamic` or `weight_only` step."""
    if step.kind == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{step.bits}"),
                                granularity=PerGroup(step.group_size))


def check_weight_only(model: nn.Module, step: WeightOnly) -> None:
    """Every linear layer's input width must be a multiple of the group size."""
    bad = [f"{name} ({m.in_features})" for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and m.in_features % step.group_size]
    if bad:
        raise UserError(f"weight_only: group_size {step.group_size} does not divide the input width of "
                        f"{', '.join(bad)}; choose a divisor")


def apply_torchao(model: nn.Module, step) -> nn.Module:
    quantize_(model, torchao_config(step))
    return model


# ---------------------------------------------------------------- PT2E static int8


def export(model: nn.Module, in_shape: list[int]) -> GraphModule:
    """The model as an ATen graph with a dynamic batch dimension (so batch 1 and 256 both run)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, *in_shape)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()


def prepare(model: nn.Module, in_shape: list[int], qat: bool = False) -> GraphModule:
    """Export and insert observers (or fake-quantizers for QAT) where the x86 quantizer wants them."""
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_qat=qat))
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(export(model, in_shape), quantizer)
    allow_exported_model_train_eval(prepared)  # QAT fine-tuning calls .train()/.eval()
    return prepared


@torch.no_grad()
def calibrate(prepared: GraphModule, x: torch.Tensor, batch_size: int = 256) -> None:
    prepared.eval()
    for start in range(0, len(x), batch_size):
        prepared(x[start:start + batch_size])


def convert(prepared: GraphModule) -> GraphModule:
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)  # so evaluation code may call .eval()
    return converted


class Observer(Protocol):
    """An observer or fake-quantizer, as `record_qparams` reads one (torchao ships no types)."""

    dtype: torch.dtype
    qscheme: torch.qscheme
    quant_min: int
    quant_max: int

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def observers(prepared: GraphModule) -> dict[str, Observer]:
    """Observers by the names the graph calls them. Read from the graph, not named_children():
    operators that keep their input's scale (pooling, flatten) share one observer module
    under several names, and named_children() lists a shared module once."""
    return {node.target: cast(Observer, prepared.get_submodule(node.target)) for node in prepared.graph.nodes
            if node.op == "call_module" and node.target.startswith("activation_post_process")}


def record_qparams(prepared: GraphModule) -> QParams:
    """Each observer's (or fake-quantizer's) scale, zero point and integer format."""
    out = {}
    for name, obs in observers(prepared).items():
        scale, zero_point = obs.calculate_qparams()
        out[name] = {"scale": scale.detach().clone().float(), "zero_point": zero_point.detach().clone().int(),
                     "dtype": str(obs.dtype).removeprefix("torch."),
                     "qscheme": str(obs.qscheme).removeprefix("torch."),
                     "quant_min": int(obs.quant_min), "quant_max": int(obs.quant_max),
                     "ch_axis": int(getattr(obs, "ch_axis", -1))}
    return out


class FrozenQParams(ObserverBase):
    """An observer that observes nothing and returns recorded quantization parameters."""

    def __init__(self, q: dict[str, Any]):
        super().__init__(dtype=getattr(torch, q["dtype"]), is_dynamic=False)
        self.qscheme = getattr(torch, q["qscheme"])
        self.quant_min, self.quant_max, self.ch_axis = q["quant_min"], q["quant_max"], q["ch_axis"]
        self.register_buffer("scale", q["scale"])
        self.register_buffer("zero_point", q["zero_point"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point


def freeze(prepared: GraphModule, qparams: QParams) -> GraphModule:
    """Swap every observer for its recorded parameters; refuse a graph that does not match."""
    names = set(observers(prepared))
    if names != set(qparams):
        raise UserError(f"recorded quantization parameters do not match this model's graph ({len(qparams)} "
                        f"recorded, {len(names)} observers): saved with another torch/torchao version?")
    for name, q in qparams.items():
        setattr(prepared, name, FrozenQParams(q))
    return prepared


def weight_observers(prepared: GraphModule) -> dict[str, str]:
    """{parameter name: observer name} for observers that read a model weight directly."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith("activation_post_process") \
                and node.args and getattr(node.args[0], "op", None) == "get_attr":
            out[node.args[0].target] = node.target
    return out


def int8_weight(w: torch.Tensor, q: dict[str, Any]) -> torch.Tensor:
    """`w` quantized exactly as convert does (the same decomposed op)."""
    return _per_channel_op(torch.ops.quantized_decomposed.quantize_per_channel, w, q)


def dequantized_weight(w8: torch.Tensor, q: dict[str, Any]) -> torch.Tensor:
    return _per_channel_op(torch.ops.quantized_decomposed.dequantize_per_channel, w8, q)


def _per_channel_op(op: Callable, w: torch.Tensor, q: dict[str, Any]) -> torch.Tensor:
    if q["qscheme"] not in ("per_channel_symmetric", "per_channel_affine"):
        raise UserError(f"weights quantized {q['qscheme']}: only per-channel weights are stored as int8")
    return op(w, q["scale"], q["zero_point"].long(), q["ch_axis"], q["quant_min"], q["quant_max"], torch.int8)
