import pytest
import torch

from distillery.config import CNNConfig, ResNetConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, count_macs, count_params, make_spec, summarize


@pytest.mark.parametrize("in_shape", [[1, 8, 8], [3, 32, 32]])
@pytest.mark.parametrize("cfg", [ResNetConfig(), ResNetConfig(width=16, blocks=[2, 1, 1]), CNNConfig(),
                                 CNNConfig(width_mult=0.5)])
def test_spec_to_shapes(cfg, in_shape):
    spec = make_spec(cfg, in_shape, 10)
    model = build_model(spec)
    assert model(torch.zeros(3, *in_shape)).shape == (3, 10)


def test_student_matches_the_brief_for_cifar():
    """conv(3->32) pool conv(32->64) pool fc(64*8*8 -> 128) fc(128 -> 10)."""
    model = build_model(make_spec(CNNConfig(), [3, 32, 32], 10))
    expected = (3 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 8 * 8 * 128 + 128) + (128 * 10 + 10)
    assert count_params(model) == expected
    # MACs: conv1 at 32x32, conv2 at 16x16, then the two linear layers (bias adds not counted).
    assert count_macs(model, [3, 32, 32]) == 32 * 32 * 32 * 27 + 16 * 16 * 64 * 288 + 4096 * 128 + 128 * 10


def test_width_multiplier_scales_channels():
    spec = make_spec(CNNConfig(width_mult=0.5), [1, 8, 8], 10)
    assert spec["channels"] == [16, 32] and spec["hidden"] == 64


def test_teacher_is_bigger_than_student_on_digits():
    teacher = make_spec(ResNetConfig(), [1, 8, 8], 10)
    student = make_spec(CNNConfig(), [1, 8, 8], 10)
    t, s = summarize(build_model(teacher), teacher), summarize(build_model(student), student)
    assert t["macs"] > 4 * s["macs"] and t["params"] > s["params"]


def test_resnet_stages_downsample():
    spec = make_spec(ResNetConfig(width=8, blocks=[1, 2]), [1, 8, 8], 10)
    assert spec["stages"] == [[8], [16, 16]]
    model = build_model(spec)
    assert model.stages(model.stem(torch.zeros(1, 1, 8, 8))).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("spec, key", [
    ({"kind": "mlp", "in_shape": [1, 8, 8], "num_classes": 10}, "kind"),
    ({"kind": "cnn", "in_shape": [1, 8], "num_classes": 10, "channels": [4, 8], "hidden": 16}, "in_shape"),
    ({"kind": "cnn", "in_shape": [1, 8, 8], "num_classes": 10, "channels": [4, 8], "hidden": 0}, "hidden"),
    ({"kind": "cnn", "in_shape": [1, 8, 8], "num_classes": 10, "channels": [4, 8], "hidden": 8, "x": 1}, "x"),
    ({"kind": "resnet", "in_shape": [1, 8, 8], "num_classes": 1, "stem": 8, "stages": [[8]]}, "num_classes"),
])
def test_bad_spec_names_the_key(spec, key):
    with pytest.raises(UserError, match=f"invalid model spec: .*{key}"):
        build_model(spec)


def test_cnn_refuses_images_too_small_to_pool_twice():
    with pytest.raises(UserError, match="at least 4x4"):
        build_model({"kind": "cnn", "in_shape": [1, 2, 2], "num_classes": 2, "channels": [4, 8], "hidden": 8})


def test_every_configurable_model_kind_is_a_registered_architecture():
    import typing

    from distillery.config import ModelConfig
    from distillery.models.architectures import ARCHITECTURES

    union = typing.get_args(ModelConfig)[0]
    kinds = {cls.model_fields["kind"].default for cls in typing.get_args(union)}
    assert kinds == set(ARCHITECTURES)
