"""Standard architectures from torchvision (`model.kind: torchvision`), built without weights."""

import pytest
import torch

from distillery.compat.torchvision import torchvision
from distillery.config import TorchvisionConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec
from distillery.models.standard import names


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
@pytest.mark.parametrize("in_shape", [[1, 8, 8], [3, 32, 32]])
def test_a_torchvision_model_is_built_for_the_data(name, in_shape):
    model = build_model(make_spec(TorchvisionConfig(name=name), in_shape, 10))
    assert model(torch.zeros(2, *in_shape)).shape == (2, 10)


def test_keys_are_torchvisions_own_and_grey_images_get_a_one_channel_stem():
    """Weights saved from torchvision's own model load as they are; for grey images only the
    stem's input channels differ."""
    ours = build_model(make_spec(TorchvisionConfig(name="resnet18"), [1, 8, 8], 10)).state_dict()
    theirs = torchvision().models.resnet18(num_classes=10).state_dict()
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if ours[k].shape != theirs[k].shape]
    assert differ == ["conv1.weight"] and ours["conv1.weight"].shape[1] == 1 and \
        theirs["conv1.weight"].shape[1] == 3


def test_only_classification_models_are_offered():
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0"} <= set(names())
    assert not {"fasterrcnn_resnet50_fpn", "fcn_resnet50", "r3d_18"} & set(names())


def test_an_unknown_name_and_an_input_a_model_cannot_take_are_refused_by_name():
    with pytest.raises(UserError,
                       match="'resnet1' is not one of torchvision's classification models .*resnet18"):
        build_model(make_spec(TorchvisionConfig(name="resnet1"), [3, 32, 32], 10))
    with pytest.raises(UserError,
                       match=r"vit_b_16 does not take images of shape \[3, 32, 32\]: Wrong image height"):
        build_model(make_spec(TorchvisionConfig(name="vit_b_16"), [3, 32, 32], 10))
