"""`objective`: the one place every training path gets its model, loss and targets from."""

import torch

from distillery.config import DistillConfig, HintConfig, TrainConfig
from distillery.models.architectures import build_model
from distillery.training.hints import HintStudent
from distillery.training.losses import kd_loss
from distillery.training.objective import objective

SPEC = {"kind": "cnn", "in_shape": [1, 8, 8], "num_classes": 10, "channels": [4, 8], "hidden": 16}
TEACHER_SPEC = {"kind": "resnet", "in_shape": [1, 8, 8], "num_classes": 10, "stem": 8, "stages": [[8], [16]]}


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 8, 8, generator=g), torch.tensor([1, 2, 3, 4])


def test_without_a_teacher_it_is_cross_entropy_with_the_configured_smoothing():
    student, (x, y) = build_model(SPEC), _batch()
    goal = objective(student, TrainConfig(label_smoothing=0.1), DistillConfig())
    assert goal.model is student and torch.equal(goal.make_target(x, y), y)
    logits = student(x)
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(goal.loss_fn(logits, y), expected)


def test_with_a_teacher_targets_pack_its_logits_and_the_loss_is_hintons():
    student, teacher, (x, y) = build_model(SPEC), build_model(TEACHER_SPEC).eval(), _batch()
    d = DistillConfig(temperature=3.0, alpha=0.7)
    goal = objective(student, TrainConfig(), d, teacher=teacher)
    target = goal.make_target(x, y)
    assert target.shape == (4, 11) and not target.requires_grad
    assert torch.equal(target[:, 0].long(), y) and torch.allclose(target[:, 1:], teacher(x))
    logits = student(x)
    assert torch.allclose(goal.loss_fn(logits, target), kd_loss(logits, teacher(x), y, 3.0, 0.7))


def test_cached_logits_arrive_in_the_batches_and_are_not_recomputed():
    student, (x, y) = build_model(SPEC), _batch()
    goal = objective(student, TrainConfig(), DistillConfig(), cached_logits=True)
    packed = torch.cat([y.float()[:, None], torch.zeros(4, 10)], 1)
    assert goal.make_target(x, packed) is packed


def test_hints_wrap_the_student_unless_switched_off():
    student, teacher = build_model(SPEC), build_model(TEACHER_SPEC).eval()
    d = DistillConfig(hints=[HintConfig(teacher_layer="stages.1", student_layer="conv2")])
    wrapped = objective(student, TrainConfig(), d, teacher=teacher, image_shape=[1, 8, 8], num_classes=10)
    assert isinstance(wrapped.model, HintStudent) and wrapped.model.student is student
    plain = objective(student, TrainConfig(), d, teacher=teacher, hints=False)
    assert plain.model is student
