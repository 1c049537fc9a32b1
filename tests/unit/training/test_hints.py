import pytest
import torch

from distillery.config import CNNConfig, HintConfig, ResNetConfig, TrainConfig, load_config
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec
from distillery.training.hints import wrap_for_hints
from distillery.training.loop import fit

HINT = [HintConfig(teacher_layer="stages.1", student_layer="conv2", weight=1.0)]


def _pair():
    student = build_model(make_spec(CNNConfig(width_mult=0.25), [1, 8, 8], 4))
    teacher = build_model(make_spec(ResNetConfig(width=8, blocks=[1, 1]), [1, 8, 8], 4)).eval()
    return student, teacher


def test_wrapped_student_appends_adapted_features():
    student, teacher = _pair()
    wrapped, make_target, _ = wrap_for_hints(student, teacher, HINT, [1, 8, 8], 4, 4.0, 0.9)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 4, (5,))
    # student conv2 is [16, 4, 4]; teacher stages.1 is [16, 4, 4]: adapter 16 -> 16, 256 values each.
    assert wrapped(x).shape == (5, 4 + 16 * 4 * 4)
    target = make_target(x, y)
    assert target.shape == (5, 1 + 4 + 16 * 4 * 4)
    assert torch.equal(target[:, 0].long(), y)
    assert torch.allclose(target[:, 1:5], teacher(x))


def test_hint_training_lowers_the_loss_and_leaves_the_student_plain():
    student, teacher = _pair()
    keys = set(student.state_dict())
    wrapped, make_target, loss_fn = wrap_for_hints(student, teacher, HINT, [1, 8, 8], 4, 4.0, 0.9)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 4, (64,))
    history = fit(wrapped, (x, y), None, TrainConfig(epochs=4, batch_size=16, lr=0.01, augment=False), seed=0,
                  loss_fn=loss_fn, make_target=make_target)
    assert history[-1]["loss"] < history[0]["loss"]
    assert set(student.state_dict()) == keys  # the adapters live in the wrapper only
    assert {k for k in wrapped.state_dict() if k.startswith("adapters.")}


def test_unknown_layer_is_named():
    student, teacher = _pair()
    bad = [HintConfig(teacher_layer="stages.1", student_layer="conv9")]
    with pytest.raises(UserError, match="no layer 'conv9' in the student"):
        wrap_for_hints(student, teacher, bad, [1, 8, 8], 4, 4.0, 0.9)


def test_non_feature_map_layer_is_refused():
    student, teacher = _pair()
    bad = [HintConfig(teacher_layer="stages.1", student_layer="fc1")]
    with pytest.raises(UserError, match="not a \\[C, H, W\\] feature map"):
        wrap_for_hints(student, teacher, bad, [1, 8, 8], 4, 4.0, 0.9)


@pytest.mark.parametrize("override", ["student.train.parallelism=fsdp", "student.train.parallelism=pipeline",
                                      "distill.cache_teacher_logits=true"])
def test_hints_refuse_what_cannot_carry_them(override):
    hints = "distill.hints=[{teacher_layer: stages.1, student_layer: conv2}]"
    with pytest.raises(UserError, match="distill.hints need"):
        load_config(None, [hints, override])
