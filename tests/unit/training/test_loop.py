
import pytest
import torch

from distillery.config import CNNConfig, TrainConfig
from distillery.models.architectures import build_model, make_spec
from distillery.training.loop import batches, evaluate, fit, random_shift


def _toy_data(n=256, seed=0):
    """Four classes, each a bright quadrant in an 8x8 image, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 0.7
    return x, y


def _student():
    return build_model(make_spec(CNNConfig(width_mult=0.25), [1, 8, 8], 4))


def test_training_lowers_the_loss_and_learns():
    x, y = _toy_data()
    model = _student()
    before = evaluate(model, batches(x, y, 64))
    history = fit(model, (x, y), None, TrainConfig(epochs=5, batch_size=32, lr=0.01), seed=0)
    after = evaluate(model, batches(x, y, 64))
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9
    assert history[0]["samples"] == 256


def test_same_seed_same_weights():
    x, y = _toy_data()
    cfg = TrainConfig(epochs=2, batch_size=32)
    a, b = _student(), _student()
    torch.manual_seed(1)
    a.load_state_dict(b.state_dict())
    fit(a, (x, y), None, cfg, seed=3)
    fit(b, (x, y), None, cfg, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_validation_metrics_are_reported():
    x, y = _toy_data()
    history = fit(_student(), (x[:200], y[:200]), (x[200:], y[200:]), TrainConfig(epochs=1), seed=0)
    assert 0.0 <= history[0]["val_accuracy"] <= 1.0 and history[0]["val_loss"] > 0


def test_random_shift_moves_pixels_by_at_most_one():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert ((rows - 4).abs() <= 1).all() and ((cols - 4).abs() <= 1).all()
    assert len(set(where.tolist())) > 1  # it does shift, not always the same way
    assert torch.equal(out.sum((1, 2, 3)), torch.ones(64))


def test_random_flip_mirrors_some_images():
    x = torch.zeros(32, 1, 4, 4)
    x[:, :, :, 0] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    flipped = out[:, 0, 0, 3] == 1.0
    assert 0 < flipped.sum() < 32


def test_batches_cover_everything_once():
    x, y = torch.arange(10).float(), torch.arange(10)
    generator = torch.Generator().manual_seed(0)
    seen = torch.cat([b[1] for b in batches(x, y, 3, shuffle=True, generator=generator)])
    assert sorted(seen.tolist()) == list(range(10))


def test_device_selection_on_a_cpu_machine():
    from distillery.core.errors import UserError
    from distillery.training.loop import pick_device

    assert pick_device(False) == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device(True).type == "cuda"
    else:
        with pytest.raises(UserError, match="ray.use_gpu is true but this process sees no CUDA device"):
            pick_device(True)


def test_autocast_is_a_no_op_on_cpu():
    from distillery.training.loop import with_autocast

    step = lambda x, t: x.dtype  # noqa: E731
    assert with_autocast(step, torch.device("cpu"), bf16=True) is step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_training_on_gpu_with_bf16_autocast():
    x, y = _toy_data()
    model = _student()
    history = fit(model, (x, y), None, TrainConfig(epochs=3, batch_size=32, lr=0.01, bf16=True), seed=0,
                  device=torch.device("cuda"))
    assert next(model.parameters()).is_cuda and history[-1]["loss"] < history[0]["loss"]
