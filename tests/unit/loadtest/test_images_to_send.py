"""What the load test sends: validation images (it tunes settings, a choice, so never the test
split), repeated when a request needs more than the split holds; a run without any is refused."""

import pytest
import torch

from distillery import data
from distillery.config import DataConfig
from distillery.core.errors import UserError
from distillery.loadtest.run import images_to_send


def _run(tmp_path, **fields):
    data.prepare(DataConfig(source="synthetic", image_shape=[1, 8, 8], num_classes=4, num_samples=80,
                            **fields), tmp_path / "data", seed=0)
    return tmp_path


def test_the_load_is_validation_images_repeated_to_the_size_asked(tmp_path):
    run = _run(tmp_path, val_fraction=0.1)
    val = data.load_split(run / "data", "val")[0]
    sent = images_to_send(run, len(val) * 2 + 1)
    assert torch.equal(sent, torch.cat([val, val, val[:1]]))


def test_a_run_without_validation_images_is_refused_naming_why(tmp_path):
    run = _run(tmp_path, val_fraction=0.0)
    with pytest.raises(UserError, match="validation split is empty"):
        images_to_send(run, 4)
