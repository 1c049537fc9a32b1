"""Parallel strategies: layer splitting in-process, then ddp / fsdp / pipeline on 2 CPU processes.

Each distributed strategy is spawned once (2 processes, gloo, `file://` rendezvous in tmp_path);
the workers run every scenario and write tensors (safetensors) and numbers (JSON) to tmp_path;
the tests below compare them with the same training done by the plain model in this process.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import CONFIGS, assert_same_state, fixed_data, model_of, spec_of

from distillery.training.parallel import make_strategy

WORLD = 2
DIST_STRATEGIES = ["ddp", "fsdp", "pipeline"]
# Pipeline batches: 16 -> 4 micro-batches of 4; 6 -> 3 of 2; 7 (prime) -> 1 of 7.
PIPE_SIZES = [16, 16, 6, 7]
DP_STEPS = 3  # ddp/fsdp: the 16-image batch, half per rank
LR = 0.1


def packed_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [N,K], target [N,1+K] float: CE on the label column plus MSE to the teacher logits."""
    return F.cross_entropy(logits, target[:, 0].long()) + F.mse_loss(logits, target[:, 1:])


def batch_plan(name: str) -> list[int]:
    """Batch sizes of the steps: what every rank is given (pipeline) or splits in halves."""
    return PIPE_SIZES if name == "pipeline" else [16] * DP_STEPS


def rank_share(name: str, rank: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Data parallel: this rank's half of the batch; pipeline: the whole batch on every rank."""
    return list(tensors) if name == "pipeline" else [t.chunk(WORLD)[rank] for t in tensors]


def reference_train(kind: str, sizes: list[int], loss_fn,
                    target_index: int = 1) -> tuple[torch.nn.Module, list[float]]:
    """The same SGD steps on the whole batches with the plain model, in this process."""
    model, data = model_of(kind, 0), fixed_data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for n in sizes:
        opt.zero_grad()
        loss = loss_fn(model(data[0][:n]), data[target_index][:n])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _worker(rank: int, name: str, out: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores: more threads each made steps ~50x slower
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        strategy = make_strategy(name, rank=rank, world_size=WORLD, microbatches=4)
        io = _RankIO(Path(out), rank)
        for kind in CONFIGS:
            _train_and_reload(strategy, kind, io)
        _resume(strategy, io)
        _packed_target(strategy, io)
        dist.barrier()  # both ranks have written everything
    except BaseException:
        dist.destroy_process_group()
        raise
    # gloo's teardown can still abort a rank (SIGABRT, "terminate called without an active
    # exception") when the other closes its sockets first: seen once in a full-suite run after
    # every result was written. Nothing is left to do, so leave without running it.
    os._exit(0)


class _RankIO:
    """Files in the shared folder: `<what>.rank<r>.safetensors` / `.json`."""

    def __init__(self, root: Path, rank: int):
        self.root, self.rank = root, rank

    def put(self, what: str, tensors: dict | None = None, **numbers) -> None:
        if tensors is not None:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      self.root / f"{what}.rank{self.rank}.safetensors")
        if numbers:
            (self.root / f"{what}.rank{self.rank}.json").write_text(json.dumps(numbers))

    def merged(self, what: str) -> dict[str, torch.Tensor]:
        dist.barrier()  # every rank has written its part
        return merge_ranks(self.root, what)


def _train_and_reload(strategy, kind: str, io: _RankIO) -> None:
    spec, (x, y, _) = spec_of(kind), fixed_data()
    model = strategy.wrap(model_of(kind, 0), spec)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for n in batch_plan(strategy.name):
        xb, yb = rank_share(strategy.name, io.rank, x[:n], y[:n])
        losses.append(strategy.train_step(model, xb, yb, F.cross_entropy, opt))
    io.put(f"train_{kind}", strategy.owned_state(model), losses=losses,
           names=sorted(strategy.local_parameter_names(model)), numel=strategy.local_numel(model))
    state = io.merged(f"train_{kind}")

    fresh = strategy.wrap(model_of(kind, 1), spec)  # other weights, so loading must change them
    before = strategy.predict(fresh, x)
    strategy.load_owned_state(fresh, state)
    preds = {"trained": strategy.predict(model, x), "before": before, "loaded": strategy.predict(fresh, x),
             "odd_batch": strategy.predict(model, x[:7])}  # pipeline: 1 micro-batch of 7
    io.put(f"predict_{kind}", {k: v for k, v in preds.items() if v is not None} or None)


def _resume(strategy, io: _RankIO) -> None:
    """Uninterrupted 4 AdamW steps (a) vs 2 + checkpoint + resume 2 (b), and resume with a fresh
    optimizer (c), which must differ: it proves the optimizer state is what (b) restores."""
    x, y, _ = rank_share(strategy.name, io.rank, *fixed_data())

    def run(model, opt, steps: int) -> None:
        for _ in range(steps):
            strategy.train_step(model, x, y, F.cross_entropy, opt)

    spec = spec_of("cnn")
    model = strategy.wrap(model_of("cnn", 0), spec)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    run(model, opt, 2)
    io.put("resume_ckpt", strategy.owned_state(model))
    opt_state = strategy.optimizer_state(model, opt)
    if opt_state is not None:
        torch.save(opt_state, io.root / f"resume_opt.rank{io.rank}.pt")
    run(model, opt, 2)
    io.put("resume_a", strategy.owned_state(model))
    ckpt = io.merged("resume_ckpt")

    # pipeline: each rank reads back its own optimizer file; ddp/fsdp: every rank reads rank 0's.
    own = io.rank if strategy.name == "pipeline" else 0
    for what, with_opt in [("resume_b", True), ("resume_c", False)]:
        model = strategy.wrap(model_of("cnn", 1), spec)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        strategy.load_owned_state(model, ckpt)
        if with_opt:
            saved = torch.load(io.root / f"resume_opt.rank{own}.pt", weights_only=True)
            strategy.load_optimizer_state(model, opt, saved)
        run(model, opt, 2)
        io.put(what, strategy.owned_state(model))

    # A stateless optimizer (SGD, no momentum) round-trips too: only its hyper-parameters.
    model = strategy.wrap(model_of("cnn", 0), spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run(model, opt, 1)
    state = strategy.optimizer_state(model, opt)
    if state is not None:
        torch.save(state, io.root / f"stateless_opt.rank{io.rank}.pt")
    dist.barrier()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    saved = torch.load(io.root / f"stateless_opt.rank{own}.pt", weights_only=True)
    strategy.load_optimizer_state(model, opt, saved)
    io.put("stateless", lr=opt.param_groups[0]["lr"])


def _packed_target(strategy, io: _RankIO) -> None:
    """Distillation's float target [N, 1+K] goes through train_step (split like x)."""
    model = strategy.wrap(model_of("cnn", 0), spec_of("cnn"))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, _, packed = fixed_data()
    losses = []
    for n in batch_plan(strategy.name)[:2]:
        xb, tb = rank_share(strategy.name, io.rank, x[:n], packed[:n])
        losses.append(strategy.train_step(model, xb, tb, packed_loss, opt))
    io.put("packed", strategy.owned_state(model), losses=losses)


def merge_ranks(root: Path, what: str) -> dict[str, torch.Tensor]:
    """Union of the ranks' dicts; a key written by two ranks would be a broken split."""
    merged: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob(f"{what}.rank*.safetensors")):
        part = load_file(path)
        assert not merged.keys() & part.keys(), f"ranks overlap in {what}"
        merged.update(part)
    return merged


def rank_json(root: Path, what: str) -> list[dict]:
    return [json.loads((root / f"{what}.rank{r}.json").read_text()) for r in range(WORLD)]


def reported_losses(root: Path, what: str) -> list[float]:
    """Losses of the rank that computes them (pipeline: the last stage; ddp/fsdp: rank 0)."""
    ranks = [r["losses"] for r in rank_json(root, what) if r["losses"][0] is not None]
    assert ranks, "no rank reported a loss"
    return ranks[0]


@pytest.fixture(scope="module", params=DIST_STRATEGIES)
def run(request, tmp_path_factory) -> tuple[str, Path]:
    """(strategy name, folder of the results its 2 workers wrote)."""
    name, out = request.param, tmp_path_factory.mktemp(request.param)
    mp.spawn(_worker, args=(name, str(out)), nprocs=WORLD, join=True)
    return name, out


@pytest.mark.parametrize("kind", CONFIGS)
def test_train_steps_lower_the_loss(run, kind):
    name, out = run
    losses = reported_losses(out, f"train_{kind}")
    assert all(isinstance(v, float) for v in losses)
    on_full_batch = [loss for loss, n in zip(losses, batch_plan(name)) if n == 16]
    assert on_full_batch[-1] < on_full_batch[0] - 1e-3, losses


def test_data_and_pipeline_parallel_match_one_process(run):
    """SmallCNN (no BatchNorm), SGD: the merged weights after the steps equal the plain model's
    trained on whole batches; pipeline also for 6 and 7-image batches (3 and 1 micro-batches)."""
    name, out = run
    want, want_losses = reference_train("cnn", batch_plan(name), F.cross_entropy)
    assert_same_state(merge_ranks(out, "train_cnn"), want.state_dict())
    if name == "pipeline":  # the last stage reports the whole batch's mean loss
        assert reported_losses(out, "train_cnn") == pytest.approx(want_losses, abs=1e-5)


@pytest.mark.parametrize("kind", CONFIGS)
def test_split_is_real(run, kind):
    name, out = run
    full = dict(model_of(kind, 0).named_parameters())
    total = sum(p.numel() for p in full.values())
    ranks = rank_json(out, f"train_{kind}")
    names = [set(r["names"]) for r in ranks]
    numels = [r["numel"] for r in ranks]
    if name == "pipeline":
        assert all(names) and not names[0] & names[1]
        assert names[0] | names[1] == set(full)
        assert numels == [sum(full[n].numel() for n in s) for s in names]
    elif name == "fsdp":
        assert names == [set(full)] * WORLD
        assert all(0 < n < total for n in numels) and sum(numels) == total
        assert max(numels) < 0.7 * total  # about half each
    else:
        assert names == [set(full)] * WORLD and numels == [total] * WORLD


@pytest.mark.parametrize("kind", CONFIGS)
def test_owned_state_is_the_full_state_dict(run, kind):
    name, out = run
    writers = sorted(p.name for p in out.glob(f"train_{kind}.rank*.safetensors"))
    ranks = range(WORLD) if name == "pipeline" else [0]  # others return None
    assert writers == [f"train_{kind}.rank{r}.safetensors" for r in ranks]
    merged = merge_ranks(out, f"train_{kind}")  # asserts no key is owned twice
    want = model_of(kind, 0).state_dict()
    assert merged.keys() == want.keys()
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in want.items()}


@pytest.mark.parametrize("kind", CONFIGS)
def test_load_owned_state_reproduces_predictions(run, kind):
    """predict on the trained model = plain model with the merged state; a fresh, differently
    initialised model after load_owned_state predicts the same."""
    _, out = run
    # The lowest rank with logits: rank 0 (ddp/fsdp) or the last stage. Under ddp/fsdp each rank
    # keeps its own BatchNorm running stats, and the checkpoint holds rank 0's.
    preds = load_file(min(out.glob(f"predict_{kind}.rank*.safetensors")))
    plain = model_of(kind, 2)
    plain.load_state_dict(merge_ranks(out, f"train_{kind}"))
    with torch.no_grad():
        want = plain.eval()(fixed_data()[0])
    assert preds["trained"].shape == (16, 4)
    torch.testing.assert_close(preds["trained"], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(preds["odd_batch"], want[:7], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(preds["loaded"], preds["trained"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(preds["before"], preds["trained"], atol=1e-3)


def test_optimizer_state_resumes_training_exactly(run):
    _, out = run
    uninterrupted, resumed = merge_ranks(out, "resume_a"), merge_ranks(out, "resume_b")
    assert_same_state(resumed, uninterrupted, atol=1e-6)
    fresh_optimizer = merge_ranks(out, "resume_c")
    assert any(not torch.allclose(fresh_optimizer[k], uninterrupted[k], atol=1e-4) for k in uninterrupted)
    assert [r["lr"] for r in rank_json(out, "stateless")] == [0.05] * WORLD


def test_packed_float_target_goes_through_train_step(run):
    name, out = run
    sizes = batch_plan(name)[:2]
    want, want_losses = reference_train("cnn", sizes, packed_loss, target_index=2)
    assert_same_state(merge_ranks(out, "packed"), want.state_dict())
    if name == "pipeline":
        assert reported_losses(out, "packed") == pytest.approx(want_losses, abs=1e-5)
