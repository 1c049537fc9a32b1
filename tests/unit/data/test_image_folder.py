"""data.source: folder — an image folder written here with Pillow: classes from subfolders,
fixed splits from <split>/ folders, resizing, mode conversion, and files that are not images
skipped and listed, never silently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distillery import data
from distillery.config import DataConfig
from distillery.core.errors import UserError


def _png(path, value: int, size=(12, 10), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode in ("L", "P") else (value,) * (4 if mode in ("RGBA", "CMYK") else 3)
    Image.new(mode, size, colour).save(path)


def _folder(root, per_class=6):
    """Class `a` is dark (40), class `b` bright (200): the label can be read off the pixels."""
    for i in range(per_class):
        _png(root / "a" / f"{i}.png", 40)
        _png(root / "b" / f"{i}.jpg", 200)


def test_an_image_folder_becomes_shards_with_classes_from_its_subfolders(tmp_path):
    _folder(tmp_path / "imgs")
    _png(tmp_path / "imgs" / "a" / "rgba.png", 40, mode="RGBA")  # another mode: converted, kept
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "imgs" / "b" / "notes.txt").write_text("not an image")
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), image_shape=[1, 8, 8], test_fraction=0.25)
    m = data.prepare(cfg, tmp_path / "out", seed=0)
    assert m["classes"] == ["a", "b"] and m["image_shape"] == [1, 8, 8]
    assert sum(m["counts"][s]["total"] for s in data.SPLITS) == 13
    assert m["skipped"]["count"] == 2
    assert sorted(f.split(":")[0] for f in m["skipped"]["files"]) == ["b/broken.png", "b/notes.txt"]
    x, y = (torch.cat(t) for t in zip(*(data.load_split(tmp_path / "out", s) for s in data.SPLITS)))
    assert torch.allclose(x[y == 0], torch.tensor(40 / 255)) and \
        torch.allclose(x[y == 1], torch.tensor(200 / 255), atol=2 / 255)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == "folder"


def test_split_folders_fix_the_test_split_and_rgb_keeps_three_channels(tmp_path):
    _folder(tmp_path / "imgs" / "train", per_class=8)
    _png(tmp_path / "imgs" / "test" / "a" / "t.png", 40, mode="RGB")
    _png(tmp_path / "imgs" / "test" / "b" / "t.png", 200, mode="RGB")
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), image_shape=[3, 16, 16])
    m = data.prepare(cfg, tmp_path / "out", seed=0)
    assert m["counts"]["test"]["per_class"] == [1, 1]
    assert m["counts"]["train"]["total"] + m["counts"]["val"]["total"] == 16
    x, _ = data.load_split(tmp_path / "out", "test")
    assert x.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("shape,layout,says", [
    (None, "ok", "image_shape"),
    ([2, 8, 8], "ok", r"1 \(grey\) or 3 \(RGB\)"),
    ([1, 8, 8], "one class", "at least two"),
    ([1, 8, 8], "no images", "no readable images"),
])
def test_a_folder_that_cannot_be_read_is_refused_naming_why(tmp_path, shape, layout, says):
    root = tmp_path / "imgs"
    if layout == "ok":
        _folder(root)
    elif layout == "one class":
        _png(root / "a" / "0.png", 40)
    else:
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            (root / name / "x.png").write_text("no")
    with pytest.raises(UserError, match=says):
        data.prepare(DataConfig(source="folder", path=str(root), image_shape=shape), tmp_path / "out", seed=0)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_wide_image_is_centre_cropped_not_squashed(tmp_path):
    img = np.zeros((8, 24), dtype=np.uint8)
    img[:, 8:16] = 255  # a bright middle third
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(img).save(tmp_path / "imgs" / name / f"{i}.png")
    m = data.prepare(DataConfig(source="folder", path=str(tmp_path / "imgs"), image_shape=[1, 8, 8]),
                     tmp_path / "out", seed=0)
    x, _ = data.load_split(tmp_path / "out", "train")
    assert m["skipped"]["count"] == 0 and torch.all(x > 0.9)  # the crop is the bright middle
