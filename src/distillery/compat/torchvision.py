"""torchvision beside the CPU build of torch (written against torchvision 0.28 and torch 2.13).

No public way serves: torchvision's wheels on PyPI are built against torch's CUDA build, and
importing them beside the CPU build fails in a registration torchvision does without a
guard. `torchvision()` declares the two op schemas it needs and imports again.
"""

from __future__ import annotations

import sys
from functools import cache
from types import ModuleType

import torch


@cache
def torchvision() -> ModuleType:
    """torchvision, imported so that its classification models work beside a CPU build of torch.

    PyPI's torchvision wheels are built against the CUDA build of torch. Beside the CPU build
    this project pins, their C++ ops (nms, roi_align: detection only) cannot load, and
    torchvision 0.28 then fails at import, registering fake kernels for `torchvision::nms` and
    `qnms` without the guard its other registrations have. Classification models use none of
    these ops, so when that is the failure, declare the two ops' schemas and import again.
    """
    try:
        import torchvision as tv
        return tv
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[name]  # the half-imported package
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 (kept alive by the cache)
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision as tv
    tv._distillery_schemas = lib  # the Library must outlive this call, or its definitions go
    return tv
