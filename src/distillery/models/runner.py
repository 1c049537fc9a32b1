"""How a model is run: eager, channels_last, or compiled; Serve replicas and `measure.timing`
both run models through these, so a speed on the frontier is a speed a replica delivers."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

MODES = ("eager", "channels_last", "compile")
# The modes a Serve replica runs, and so the only ones a record's figures (`best_mode`) come
# from: a frontier promises what is served. `compile` is still timed and shown: a compiled
# graph recompiles for every new batch size (3.5 s for the digits student even with
# dynamic=True), and per-call guards made it slower than eager at batch 1 here (0.25 vs
# 0.14 ms for the digits student; PT2E int8 needs it, and is then ranked in its eager speed).
SERVABLE_MODES = ("eager", "channels_last")


def runner(model: nn.Module, mode: str) -> Callable[[Tensor], Tensor]:
    """A callable that runs `model` in `mode`; `model` itself is never modified.

    eager:         the model as is.
    channels_last: a deep copy in channels_last memory format; 4-D inputs are converted too.
    compile:       torch.compile(model, dynamic=False) with inductor freezing, which folds the
                   weights into constants (what makes PT2E int8 graphs fast on CPU). Freezing only
                   applies when called without autograd (torch.no_grad / inference_mode), and
                   every new input shape compiles again at its first call.
    """
    if mode == "eager":
        return model
    if mode == "channels_last":
        return _channels_last_runner(model)
    if mode == "compile":
        return _compiled_runner(model)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _channels_last_runner(model: nn.Module) -> Callable[[Tensor], Tensor]:
    # Module.to takes memory_format; torch's overloads leave it out
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def run(x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return cl_model(x)

    # What runs: a replica's metrics read a cascade's counts from it (a function's attribute)
    run.model = cl_model  # type: ignore[attr-defined]
    return run


def _compiled_runner(model: nn.Module) -> Callable[[Tensor], Tensor]:
    # Imported here: dynamo and inductor cost every replica process ~1.5 s of start-up, and a
    # replica never compiles.
    import torch._inductor.config as inductor_config
    from torch._dynamo import config as dynamo_config

    # Inductor compiles lazily at the first call of each shape, so freezing must be on then,
    # not only around torch.compile. Later calls skip the patches: they would be timed.
    with inductor_config.patch(freezing=True):
        compiled = torch.compile(model, dynamic=False)
    seen: set[tuple[int, ...]] = set()

    def run(x: Tensor) -> Tensor:
        shape = tuple(x.shape)
        if shape in seen:
            return compiled(x)
        # Past dynamo's recompile limit a compiled module silently runs eager; raise instead, so
        # eager figures are never reported as compiled ones.
        with inductor_config.patch(freezing=True), dynamo_config.patch(fail_on_recompile_limit_hit=True):
            out = compiled(x)
        seen.add(shape)
        return out

    return run
