"""Transfer sets (`distill.transfer`): the images a student is distilled on, with labels mapped
onto the teacher's classes by name, or without labels; never the run's val/test images."""

import numpy as np
import pytest
import torch
from PIL import Image

from distillery import data
from distillery.config import DataConfig
from distillery.core.errors import UserError

SYNTHETIC = {"source": "synthetic", "image_shape": [1, 8, 8], "num_classes": 4, "num_samples": 240}


@pytest.fixture
def run_data(tmp_path):
    out = tmp_path / "data"
    data.prepare(DataConfig(**SYNTHETIC), out, seed=0)
    return out


def _pngs(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")


def test_the_run_s_own_source_without_labels_is_its_training_split(run_data, tmp_path):
    """The same synthetic source: its val and test images are left out, what remains is the
    run's training split, every label -1."""
    manifest = data.prepare_transfer(DataConfig(**SYNTHETIC, labeled=False), tmp_path / "t", 0, run_data)
    x, y = data.load_split(tmp_path / "t", "train")
    train_x, _ = data.load_split(run_data, "train")
    assert manifest["counts"]["train"]["total"] == 168 == len(train_x) and manifest["left_out_held_out"] == 72
    assert manifest["labeled"] is False and bool((y == -1).all())
    assert sorted(map(bytes, x.numpy())) == sorted(map(bytes, train_x.numpy()))  # same images, own order
    assert manifest["classes"] == ["0", "1", "2", "3"] and manifest["num_classes"] == 4  # the teacher's


def test_labeled_folders_map_onto_the_teacher_s_classes_by_name_some_missing(run_data, tmp_path):
    _pngs(tmp_path / "imgs" / "1", 5)
    _pngs(tmp_path / "imgs" / "3", 7, seed=1)
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), image_shape=[1, 8, 8])
    manifest = data.prepare_transfer(cfg, tmp_path / "t", 0, run_data)
    assert manifest["counts"]["train"]["per_class"] == [0, 5, 0, 7]
    _, y = data.load_split(tmp_path / "t", "train")
    assert sorted(y.tolist()) == [1] * 5 + [3] * 7


def test_a_class_the_teacher_does_not_have_is_refused_by_name(run_data, tmp_path):
    _pngs(tmp_path / "imgs" / "1", 3)
    _pngs(tmp_path / "imgs" / "cat", 3)
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), image_shape=[1, 8, 8])
    with pytest.raises(UserError,
                       match=r"class\(es\) cat are not among the teacher's classes \(0, 1, 2, 3\)"):
        data.prepare_transfer(cfg, tmp_path / "t", 0, run_data)
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_an_unlabeled_folder_is_read_at_any_depth_and_broken_files_are_counted(run_data, tmp_path):
    _pngs(tmp_path / "imgs", 4)
    _pngs(tmp_path / "imgs" / "a" / "b", 3, seed=2)
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not an image")
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), image_shape=[1, 8, 8], labeled=False)
    manifest = data.prepare_transfer(cfg, tmp_path / "t", 0, run_data)
    assert manifest["counts"]["train"]["total"] == 7 and manifest["skipped"]["count"] == 1
    assert "a/broken.png" in manifest["skipped"]["files"][0]


def test_images_of_another_shape_are_refused(run_data, tmp_path):
    cfg = DataConfig(**{**SYNTHETIC, "image_shape": [3, 8, 8]}, labeled=False)
    with pytest.raises(UserError, match=r"images of shape \[3, 8, 8\]; "
                                        r"the run's data \(and its teacher\) take \[1, 8, 8\]"):
        data.prepare_transfer(cfg, tmp_path / "t", 0, run_data)


def test_max_train_samples_caps_the_transfer_set(run_data, tmp_path):
    manifest = data.prepare_transfer(DataConfig(**SYNTHETIC, labeled=False, max_train_samples=50),
                                     tmp_path / "t", 0, run_data)
    assert manifest["counts"]["train"]["total"] == 50 == len(data.load_split(tmp_path / "t", "train")[1])
    assert torch.is_tensor(data.load_split(tmp_path / "t", "train")[0])
