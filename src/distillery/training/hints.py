"""Hint (feature) distillation, FitNets-style: a student layer learns to predict, through a
learned 1x1 adapter, the features of a teacher layer.

The student is wrapped, never changed: `HintStudent(student)` returns its logits with the
adapted features appended, `[N, K + D]`, and `TeacherHints` packs the teacher's logits and
features into the target, so the step and the loss keep their one-tensor signatures.
After training, `HintStudent.student` is the plain student; the adapters are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import HintConfig
from distillery.core.errors import UserError
from distillery.training.losses import LossFn, kd_loss, pack_target


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise UserError(f"distill.hints: no layer {name!r} in the {role} (layers: "
                        f"{', '.join(n for n in modules if n)})")
    return modules[name]


def _capture(model: nn.Module, names: list[str], role: str) -> list[torch.Tensor]:
    """Register hooks that store each named layer's output into the returned list, in order."""
    slots: list[torch.Tensor] = [torch.empty(0)] * len(names)
    for i, name in enumerate(names):
        def hook(_module, _inputs, output, i=i):
            slots[i] = output
        _module(model, name, role).register_forward_hook(hook)
    return slots


def feature_shapes(model: nn.Module, names: list[str], in_shape: list[int],
                   role: str) -> list[tuple[int, ...]]:
    """The [C, H, W] of each named layer's output for one image."""
    shapes: list[tuple[int, ...]] = []
    for name in names:
        seen: list[tuple[int, ...]] = []
        handle = _module(model, name, role).register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(tuple(o.shape[1:])))
        with torch.no_grad():
            was = model.training
            model.eval()(torch.zeros(1, *in_shape, device=next(model.parameters()).device))
            model.train(was)
        handle.remove()
        if len(seen[0]) != 3:
            raise UserError(f"distill.hints: layer {name!r} of the {role} gives {seen[0]}, "
                            "not a [C, H, W] feature map")
        shapes.append(seen[0])
    return shapes


class HintStudent(nn.Module):
    """The student plus one 1x1 conv adapter per hint: [N, C, H, W] -> [N, K + sum(C_t*H_s*W_s)]."""

    def __init__(self, student: nn.Module, hints: list[HintConfig], student_shapes, teacher_shapes):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleList(nn.Conv2d(s[0], t[0], 1)
                                      for s, t in zip(student_shapes, teacher_shapes))
        self._features = _capture(student, [h.student_layer for h in hints], "student")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.student(x)
        adapted = [a(f).flatten(1) for a, f in zip(self.adapters, self._features)]
        return torch.cat([logits, *adapted], dim=1)


class TeacherHints:
    """The frozen teacher as a target builder: (x, y) -> [N, 1 + K + D] (labels, logits, features
    average-pooled to the student's feature size)."""

    def __init__(self, teacher: nn.Module, hints: list[HintConfig], student_shapes):
        self.teacher = teacher.eval().requires_grad_(False)
        self.sizes = [s[1:] for s in student_shapes]
        self._features = _capture(teacher, [h.teacher_layer for h in hints], "teacher")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.teacher(x)
        feats = [F.adaptive_avg_pool2d(f, size).flatten(1) for f, size in zip(self._features, self.sizes)]
        return pack_target(y, torch.cat([logits, *feats], dim=1))


def hint_loss(temperature: float, alpha: float, num_classes: int, hints: list[HintConfig], teacher_shapes,
              student_shapes) -> LossFn:
    """Hinton's loss on the logits plus weight * MSE between adapted student and teacher features."""
    sizes = [t[0] * s[1] * s[2] for s, t in zip(student_shapes, teacher_shapes)]
    k = num_classes

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, rest = target[:, 0].long(), target[:, 1:]
        total = kd_loss(out[:, :k], rest[:, :k], labels, temperature, alpha)
        for h, s, t in zip(hints, out[:, k:].split(sizes, 1), rest[:, k:].split(sizes, 1)):
            total = total + h.weight * F.mse_loss(s, t)
        return total
    return loss


def wrap_for_hints(student: nn.Module, teacher: nn.Module, hints: list[HintConfig], in_shape: list[int],
                   num_classes: int, temperature: float,
                   alpha: float) -> tuple[HintStudent, TeacherHints, LossFn]:
    """Everything a training loop needs for hint distillation, checked before any work."""
    s_shapes = feature_shapes(student, [h.student_layer for h in hints], in_shape, "student")
    t_shapes = feature_shapes(teacher, [h.teacher_layer for h in hints], in_shape, "teacher")
    return (HintStudent(student, hints, s_shapes, t_shapes), TeacherHints(teacher, hints, s_shapes),
            hint_loss(temperature, alpha, num_classes, hints, t_shapes, s_shapes))
