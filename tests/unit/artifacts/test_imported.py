"""Teachers made elsewhere (`models.imported`, `models.exported`): a safetensors file for a
named architecture, a torch.export program, and the files that are refused before loading."""

import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch.export import Dim

from distillery import artifacts
from distillery.artifacts.imported import import_model
from distillery.compat.torchvision import torchvision
from distillery.config import ResNetConfig, TorchvisionConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec
from distillery.models.exported import load_program

SHAPE = [1, 8, 8]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model(make_spec(ResNetConfig(width=4, blocks=[1]), SHAPE, 4)).eval()


def _export(model, path, batch=2, dynamic=True):
    x = torch.zeros(batch, *SHAPE)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},) if dynamic else None)
    torch.export.save(program, str(path))
    return path


class _RunsCode:
    """Unpickling this makes a folder: the stand-in for code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("dynamic", [True, False])
def test_a_program_teaches_like_the_model_it_was_exported_from(teacher, tmp_path, dynamic):
    """A program exported with a fixed batch of 1 runs any batch (row chunks)."""
    path = _export(teacher, tmp_path / "t.pt2", batch=2 if dynamic else 1, dynamic=dynamic)
    got = import_model(str(path), None, SHAPE, 4)
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(got.model(x), teacher(x), atol=1e-5)
    assert got.spec == {"kind": "exported", "in_shape": SHAPE, "num_classes": 4}
    got.save(tmp_path / "folder")
    reloaded, arch = artifacts.load(tmp_path / "folder")  # the run's copy, verified by sha256
    assert arch["format"] == "exported" and torch.allclose(reloaded(x), teacher(x), atol=1e-5)
    with pytest.raises(UserError, match="cannot be trained"):
        reloaded.train()


def test_a_program_for_other_data_is_refused_naming_both_shapes(teacher, tmp_path):
    path = _export(teacher, tmp_path / "t.pt2")
    with pytest.raises(UserError, match=r"takes images of shape \[1, 8, 8\] and gives 4 classes; "
                                        r"this run's data has shape \[3, 8, 8\] and 4 classes"):
        import_model(str(path), None, [3, 8, 8], 4)
    with pytest.raises(UserError,
                       match=r"gives 4 classes; this run's data has shape \[1, 8, 8\] and 10 classes"):
        import_model(str(path), None, SHAPE, 10)


def test_a_program_that_would_run_code_when_loaded_is_refused_before_torch_reads_it(teacher, tmp_path):
    """torch.export.load falls back to a full unpickle of the sample inputs when a safe load
    fails: the check reads the archive first and refuses."""
    good, bad = _export(teacher, tmp_path / "t.pt2"), tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            evil = info.filename.endswith("sample_inputs/model.pt")
            dst.writestr(info, pickle.dumps(_RunsCode(tmp_path / "ran")) if evil else src.read(info))
    with pytest.raises(UserError, match="sample_inputs/model.pt holds more than tensors"):
        load_program(bad)
    assert not (tmp_path / "ran").exists()
    try:  # the premise: torch's own loader runs it
        torch.export.load(str(bad))
    except Exception:
        pass
    assert (tmp_path / "ran").exists()


def test_an_archive_entry_outside_a_plain_program_is_refused(teacher, tmp_path):
    good, bad = _export(teacher, tmp_path / "t.pt2"), tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        top = src.namelist()[0].split("/")[0]
        dst.writestr(f"{top}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UserError,
                       match="data/aotinductor/model/model.so is not part of a plain torch.export program"):
        load_program(bad)


def test_a_pickle_file_is_refused_unread(tmp_path):
    path = tmp_path / "teacher.pth"
    path.write_bytes(pickle.dumps(_RunsCode(tmp_path / "ran")))
    with pytest.raises(UserError, match=r"teacher.pth is a pickle-based file \(.pth\).*never read here"):
        import_model(str(path), ResNetConfig(), SHAPE, 4)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "fake.safetensors").write_bytes(pickle.dumps(_RunsCode(tmp_path / "ran")))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        import_model(str(tmp_path / "fake.safetensors"), ResNetConfig(), SHAPE, 4)
    assert not (tmp_path / "ran").exists()


def test_torchvision_weights_in_safetensors_import_for_the_named_architecture(tmp_path):
    """A state dict saved from torchvision's own resnet18 (RGB, 4 classes) is the teacher."""
    torch.manual_seed(0)
    theirs = torchvision().models.resnet18(num_classes=4).eval()
    save_file(theirs.state_dict(), str(tmp_path / "r18.safetensors"))
    got = import_model(str(tmp_path / "r18.safetensors"), TorchvisionConfig(name="resnet18"), [3, 16, 16], 4)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(got.model(x), theirs(x), atol=1e-5)
    assert got.spec["kind"] == "torchvision" and got.spec["name"] == "resnet18"


def test_weights_for_other_classes_or_channels_are_refused_naming_the_tensors(tmp_path):
    weights = str(tmp_path / "r18.safetensors")
    save_file(torchvision().models.resnet18(num_classes=1000).state_dict(), weights)
    with pytest.raises(UserError, match=r"does not fit teacher.model \(torchvision resnet18\) for this run's "
                                        r"data has shape \[1, 16, 16\] and 10 classes: conv1.weight is "
                                        r"\[64, 3, 7, 7\] in the file, \[64, 1, 7, 7\] here; fc.weight is "
                                        r"\[1000, 512\] in the file, \[10, 512\] here"):
        import_model(weights, TorchvisionConfig(name="resnet18"), [1, 16, 16], 10)
    with pytest.raises(UserError, match="missing .*not in the model"):
        import_model(weights, TorchvisionConfig(name="mobilenet_v3_small"), [3, 16, 16], 10)
