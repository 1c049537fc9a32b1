"""Per-rank training checkpoints: written, verified, refused when incomplete (no Ray)."""

import pytest
import torch

from distillery.config import CNNConfig, TrainConfig
from distillery.core.errors import UserError
from distillery.models.architectures import build_model, make_spec
from distillery.training import checkpoint
from distillery.training.loop import make_optimizer
from distillery.training.parallel import make_strategy


def _setup():
    spec = make_spec(CNNConfig(width_mult=0.25), [1, 8, 8], 4)
    model = build_model(spec)
    opt = make_optimizer(model, TrainConfig())
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    opt.step()  # so the optimizer has state worth saving
    return spec, model, opt


def _write(folder, model, opt, rank=0, world=1, epoch=3):
    folder.mkdir(exist_ok=True)
    checkpoint.write(folder, rank=rank, world_size=world, epoch=epoch,
                     strategy=make_strategy("none", rank=0, world_size=1), model=model, opt=opt,
                     trainer_state={"scheduler": {"last_epoch": 7}}, history=[{"epoch": epoch}])


def test_round_trip_restores_model_optimizer_and_history(tmp_path):
    spec, model, opt = _setup()
    _write(tmp_path, model, opt)
    assert checkpoint.verify(tmp_path, world_size=1) == 3
    fresh = build_model(spec)
    fresh_opt = make_optimizer(fresh, TrainConfig())
    state, history = checkpoint.restore(tmp_path, rank=0, world_size=1,
                                        strategy=make_strategy("none", rank=0, world_size=1),
                                        model=fresh, opt=fresh_opt)
    assert state["epoch"] == 3 and state["scheduler"] == {"last_epoch": 7}
    assert history == [{"epoch": 3}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_missing_rank_index_means_incomplete(tmp_path):
    _, model, opt = _setup()
    _write(tmp_path, model, opt, world=2)  # rank 1 never wrote its part
    with pytest.raises(UserError, match="incomplete checkpoint, rank1.json is missing"):
        checkpoint.verify(tmp_path, world_size=2)


def test_altered_file_is_refused(tmp_path):
    _, model, opt = _setup()
    _write(tmp_path, model, opt)
    weights = tmp_path / "model-rank0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(UserError, match="model-rank0.safetensors: sha256 mismatch"):
        checkpoint.verify(tmp_path, world_size=1)


def test_checkpoint_from_another_world_size_is_refused(tmp_path):
    _, model, opt = _setup()
    _write(tmp_path, model, opt)
    with pytest.raises(UserError, match="written by 1 workers, this run has 2"):
        checkpoint.verify(tmp_path, world_size=2)


def test_unregistered_checkpoint_folders_are_removed(tmp_path):
    pytest.importorskip("ray")
    from distillery.training.on_ray import _drop_unregistered

    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    _drop_unregistered(str(tmp_path), {"checkpoint_b", "checkpoint_c"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_b", "checkpoint_c",
                                                          "checkpoint_manager_snapshot.json"]
