"""GPU checks of the training path, for a CUDA machine without Ray.

The lent GPU machines carry no Ray (its wheel is larger than what can be carried there), so
this checks what the Ray workers run, minus Ray: the in-process trainer on the GPU in fp32
and bf16 autocast, and each parallelism strategy on CUDA with an NCCL process group.

    python benchmarks/gpu_check.py [OUT_DIR]

Writes OUT_DIR/gpu_check_<gpu>_<date>.json (OUT_DIR: benchmarks/results by default; on a lent
machine, the folder that comes back, to be copied into benchmarks/results).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import RESULTS, write_result

from distillery.config import CNNConfig, load_config
from distillery.models.architectures import build_model, make_spec
from distillery.pipeline.stages import run_stages
from distillery.training.losses import cross_entropy
from distillery.training.parallel import make_strategy

ROOT = Path(__file__).resolve().parents[1]


def teacher_on_gpu(bf16: bool, tmp: Path) -> dict:
    """The digits teacher trained in-process on the GPU; its test accuracy and wall time."""
    cfg = load_config(ROOT / "configs" / "digits.yaml", [f"storage_path={tmp}", f"name=gpu-bf16-{bf16}",
                                                          "ray.workers=0", "ray.use_gpu=true",
                                                          f"teacher.train.bf16={bf16}"])
    start = time.perf_counter()
    run = run_stages(cfg, ["data", "teacher"], log=lambda m: None)
    metrics = json.loads((run.root / "teacher" / "metrics.json").read_text())
    per_epoch = sorted(h["samples_per_s"] for h in metrics["history"][1:])
    return {"bf16": bf16, "test_accuracy": metrics["test_accuracy"],
            "stage_seconds": round(time.perf_counter() - start, 2),
            "median_samples_per_s": round(per_epoch[len(per_epoch) // 2], 1), "epochs": metrics["epochs"]}


def strategy_on_cuda(name: str) -> dict:
    """Five steps of one strategy on CUDA (NCCL, world size 1): the loss must fall."""
    spec = make_spec(CNNConfig(width_mult=0.5), [1, 8, 8], 10)
    torch.manual_seed(0)
    model = build_model(spec).cuda()
    strategy = make_strategy(name, rank=0, world_size=1, microbatches=4)
    model = strategy.wrap(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(64, 1, 8, 8, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    losses = [strategy.train_step(model, x, y, cross_entropy(), opt) for _ in range(5)]
    state = strategy.owned_state(model)
    return {"strategy": name, "losses": [round(v, 4) for v in losses], "loss_fell": losses[-1] < losses[0],
            "owned_state_keys_ok": set(state) == set(build_model(spec).state_dict())}


def main(out: Path) -> None:
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "strategies": [],
              "teacher": []}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            report["strategies"] = [strategy_on_cuda(name) for name in ("ddp", "fsdp", "pipeline")]
        finally:
            dist.destroy_process_group()
        report["teacher"] = [teacher_on_gpu(bf16, Path(tmp)) for bf16 in (False, True)]
    print(json.dumps(report, indent=2))
    print(f"figures: {write_result('gpu_check', report, quick=False, directory=out)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else RESULTS)
