"""report.md: the one page a user reads first after `distillery run`.

Built only from what the run wrote and verified (manifest, results, frontier, load test),
so every figure in it is one the stages measured; nothing here measures anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery import data
from distillery.config import PipelineConfig
from distillery.core.files import atomic_write_bytes, read_json
from distillery.loadtest.generator import infer_body


def write(root: Path, cfg: PipelineConfig, manifest: dict[str, Any],
          address: str | None = None) -> list[Path]:
    """Write root/report.md from the run's artifacts, and root/serve/request.json (a real
    test image as an inference request, for the curl example); return their paths.
    `address` is how commands name the run (its URI, if it lives in a bucket; default root)."""
    data = read_json(root / "data" / "manifest.json")
    request = example_request(root)
    frontier = read_json(root / "frontier.json")
    served = root / "serve" / "loadtest" / "loadtest.md"
    parts = [f"# {cfg.name}: what was trained, how fast it runs, how to use it", "",
             _training(root, cfg, manifest, data),
             "## Speed vs accuracy", "", _body(root / "frontier.md"), "![frontier](frontier.png)", "",
             _recommendation(frontier), _search(root, manifest),
             "## Serving", "", _body(served) + "\n![load test](serve/loadtest/loadtest.png)\n" +
             ("\n![adaptive scenario](serve/loadtest/adaptive.png)\n"
              if (served.parent / "adaptive.png").is_file() else "") if cfg.serve.enabled and
             served.is_file() else "Not served in this run (`serve.enabled: false`).\n",
             _how_to_query(cfg, frontier, data, request, address or str(root)),
             _machine(manifest)]
    path = root / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return [path, request]


def example_request(root: Path) -> Path:
    """The first test image as an Open Inference Protocol request body."""
    x, _ = data.load_split(root / "data", "test")
    path = root / "serve" / "request.json"
    atomic_write_bytes(path, infer_body(x[:1].reshape(-1).tolist(), list(x[:1].shape)))
    return path


def _training(root: Path, cfg: PipelineConfig, manifest: dict, data: dict) -> str:
    counts = {split: data["counts"][split]["total"] for split in ("train", "val", "test")}
    stages = manifest["stages"]
    lines = ["## What was trained", "",
             f"Data: `{data['source']}`, {counts['train']:,} train / {counts['val']:,} val / "
             f"{counts['test']:,} test images of shape {data['image_shape']}, "
             f"{data['num_classes']} classes.", ""]
    for which in cfg.trained:
        m = stages[which]["metrics"]
        if "imported_from" in m:
            lines.append(f"- **{which}**: {m['kind']}, imported from `{m['imported_from']}` (weights sha256 "
                         f"{m['imported_weights_sha256'][:12]}...), not trained here, {m['seconds']:.0f} s")
            continue
        lines.append(f"- **{which}**: {m['kind']}, {m['epochs']} epochs, {m['workers'] or 'no'} Ray Train "
                     f"workers ({m['parallelism']}), {m['seconds']:.0f} s")
        lines += [f"  - {restart_text(r)}" for r in m.get("restarts", [])]
    lines += ["", _distillation(cfg, stages), "", (root / "results.md").read_text()]  # evaluate's table
    return "\n".join(lines)


def _distillation(cfg: PipelineConfig, stages: dict) -> str:
    d = cfg.distill
    how = "the soft term alone" if d.soft_only else f"alpha {d.alpha:g}"
    text = f"The student was distilled from the frozen teacher (temperature {d.temperature:g}, {how})"
    if d.transfer:
        t = stages["transfer"]["metrics"]
        text += (f" on a transfer set: `{d.transfer.source}`, {t['rows']:,} images "
                 f"{'with' if t['labeled'] else 'without'} labels"
                 + (f" ({t['left_out_held_out']:,} left out: they are in this run's val/test splits)"
                    if t["left_out_held_out"] else ""))
    if d.soft_only:
        text += ". **The student never saw a label**: it learned from the teacher's outputs only"
    if not d.baseline:
        return text + "; no baseline was trained (distill.baseline: false), so no gain is measured."
    return text + "; `student_scratch` is the same network trained alone on the labeled data, the baseline."


def restart_text(r: dict) -> str:
    """One resume of a training run, for the report."""
    resumed = f"resumed at epoch {r['epoch']} from the checkpoint of epoch {r['resumed_from']}"
    if "worker_failures" not in r:
        return f"{resumed}, after the job's driver was restarted"
    redone = r["last_epoch_before"] - r["resumed_from"]
    return (f"{resumed} after a worker failure ({'; '.join(r['worker_failures'])}): Ray Train restarted as "
            f"many workers on the live nodes; {redone} finished epoch(s) redone, plus the one in progress")


def _body(md: Path) -> str:
    """A generated markdown report without its title line and its recommendation (which the
    report gives a section of its own)."""
    lines = md.read_text().splitlines()[1:]
    return "\n".join(line for line in lines if not line.startswith("**Recommended**")).strip() + "\n"


def _search(root: Path, manifest: dict) -> str:
    """The search's own frontier (every trial, the budget, the chosen model), when it ran."""
    if manifest["stages"].get("search", {}).get("status") != "done":
        return ""
    return ("## Search under a budget\n\n" + _body(root / "search" / "frontier.md") +
            "\n![search](search/frontier.png)\n")


def _recommendation(frontier: dict) -> str:
    rec = frontier["recommended"]
    if rec is None:
        return ("## Recommended\n\nNo variant reaches the validation accuracy floor of "
                f"{frontier['floor']:.2%}.\n")
    return (f"## Recommended: `{rec['name']}`\n\n{rec['reason']} Variants within a few percent of the "
            "fastest count as equally fast; among them the most accurate wins.\n")


def _how_to_query(cfg: PipelineConfig, frontier: dict, data: dict, request: Path, address: str) -> str:
    s = cfg.serve
    url = f"http://{s.host}:{s.port}"
    model = (frontier["recommended"] or {}).get("name", "auto")
    shape = [1, *data["image_shape"]]
    key = f' -H "x-api-key: ${s.api_key_env}"' if s.api_key_env else ""
    key_py = f', headers={{"x-api-key": os.environ["{s.api_key_env}"]}}' if s.api_key_env else ""
    return f"""## How to query the deployment

While `distillery run` (or `distillery serve {address}`) serves, with curl (Open
Inference Protocol, JSON; `{model}` is the recommended model, `auto` picks one per request;
`{request}` holds the first test image as a request):

```bash
curl -s {url}/v2/health/ready
curl -s{key} {url}/v2/models
curl -s{key} -H 'content-type: application/json' -d @{request} {url}/v2/models/{model}/infer
curl -s{key} -H 'content-type: application/json' -d @{request} {url}/v2/models/auto/infer
```

`auto` answers with the most accurate model (on validation, which chose it) that meets \
serve.auto_slo_ms at the
current load; a request may add `"parameters": {{"max_latency_ms": ...}}` (its own objective) and
`{{"min_accuracy": ...}}` (a validation accuracy floor).

With an Open Inference Protocol client (`pip install tritonclient[http]`), binary tensors:

```python
import os, numpy as np, tritonclient.http as http
client = http.InferenceServerClient("{s.host}:{s.port}")
x = np.zeros({tuple(shape)}, dtype=np.float32)
inp = http.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x, binary_data=True)
reply = client.infer("{model}", [inp]{key_py})
print(reply.as_numpy("label"), reply.as_numpy("logits"))
```

Or `distillery query --run-dir {address} --model auto --sample 8`.
"""


def _machine(manifest: dict) -> str:
    hw, v = manifest["hardware"], manifest["versions"]
    stages = manifest["stages"]
    done = sorted((r["started_at"], name, r["metrics"]["seconds"]) for name, r in stages.items()
                  if r.get("status") == "done" and "seconds" in r.get("metrics", {}))
    times = ", ".join(f"{name} {seconds:.0f} s" for _, name, seconds in done)
    return (f"## Machine and versions\n\n{hw['processor'] or hw['machine']}, {hw['cpus']} logical cores, "
            f"{hw['memory_gib']} GiB, {hw['system']}; "
            + ", ".join(f"{k} {val}" for k, val in v.items()) + "; git "
            f"{manifest.get('git_sha') or 'unknown'}.\n\nStage times: {times}.\n")
