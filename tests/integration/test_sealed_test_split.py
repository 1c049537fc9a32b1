"""The test split reports and never steers: the tiny pipeline run twice on the same images,
the second time with the test split's labels shuffled, makes the same choices.

Both runs read one Parquet file with a `split` column (the tiny preset's synthetic images,
five times as many so that its models are good, their splits fixed, so the training data is
identical); only the test rows' labels differ.
Training, the cascade's threshold, the accuracy floor and every validation figure must come
out bit for bit the same. The recommendation, the Pareto front and `auto`'s ladder also read
latencies, which no two timings share: they are chosen again from the second run's records
with the first run's timings in place, and must equal what the first run wrote. The test
figures must differ."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from distillery.config import load_config
from distillery.data.prepare import prepare
from distillery.data.shards import SPLITS, load_split
from distillery.measure.frontier import pareto_front, recommend
from distillery.serving.auto_policy import ladder

TIMING = ("p50_ms", "p99_ms", "mean_ms", "throughput", "peak_fraction", "best_mode", "modes", "not_faster",
          "servable")


def _parquet(data_dir: Path, path: Path, shuffle_test: bool) -> Path:
    columns = {"image": [], "label": [], "split": []}
    for split in SPLITS:
        images, labels = load_split(data_dir, split)
        labels = labels.numpy()
        if split == "test" and shuffle_test:
            labels = np.random.default_rng(7).permutation(labels)
        columns["image"] += list(images.flatten(1).numpy())
        columns["label"] += labels.tolist()
        columns["split"] += [split] * len(labels)
    table = pa.table({"image": pa.array(columns["image"], pa.list_(pa.float32())),
                      "label": pa.array(columns["label"], pa.int64()), "split": columns["split"]})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    from distillery.cli.main import main

    folder = tmp_path_factory.mktemp("sealed")
    synthetic = load_config(ROOT / "configs" / "tiny.yaml", ["data.num_samples=1200"])
    prepare(synthetic.data, folder / "synthetic", synthetic.seed)
    out = []
    for name, shuffle in (("labels", False), ("shuffled", True)):
        data = _parquet(folder / "synthetic", folder / f"{name}.parquet", shuffle)
        assert main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"),
                     "--set", f"storage_path={folder / name}", "--set", "data.source=parquet",
                     "--set", f"data.path={data}", "--set", "data.num_classes=null",
                     "--set", "teacher.train.epochs=4", "--set", "ray.workers=0",
                     "--set", "serve.enabled=false"]) == 0
        out.append(folder / name / "tiny")
    return out[0], out[1]


def _frontier(run: Path) -> dict:
    return json.loads((run / "frontier.json").read_text())


def test_the_same_choices_whatever_the_test_labels(runs):
    a, b = (_frontier(run) for run in runs)
    assert a["floor"] == b["floor"] and a["chosen_on"] == b["chosen_on"] == "validation"
    records_a, records_b = ({r["name"]: r for r in f["variants"]} for f in (a, b))
    assert records_a.keys() == records_b.keys()
    for name, r in records_a.items():
        validation = {k: v for k, v in r.items() if k.startswith("val_")}
        assert validation == {k: records_b[name][k] for k in validation}, name
        assert r.get("steps") == records_b[name].get("steps"), name  # cascade thresholds, fine-tune figures
    # The second run's records with the first run's timings: the first run's choices.
    timed = [{**r, **{k: records_a[r["name"]][k] for k in TIMING if k in records_a[r["name"]]}}
             for r in b["variants"]]
    margin = 0.05  # tiny.yaml keeps the default compress.speedup_margin
    assert recommend(timed, b["floor"], margin) == a["recommended"]
    assert pareto_front(timed) == a["pareto"]
    rungs = [SimpleNamespace(name=r["name"], val_accuracy=r["val_accuracy"], p50_ms=r["p50_ms"])
             for r in timed]
    first = [SimpleNamespace(name=r["name"], val_accuracy=r["val_accuracy"], p50_ms=r["p50_ms"])
             for r in a["variants"]]
    assert [m.name for m in ladder(rungs)] == [m.name for m in ladder(first)]
    # Only the reported test figures moved: every model's, toward chance.
    assert records_a["teacher"]["test_accuracy"] > 0.9, records_a["teacher"]
    assert all(records_b[n]["test_accuracy"] < 0.5 < records_a[n]["test_accuracy"] for n in records_a), \
        {n: (records_a[n]["test_accuracy"], records_b[n]["test_accuracy"]) for n in records_a}


def test_the_report_says_what_chose_and_what_one_image_is_worth(runs):
    a, _ = runs
    md = (a / "frontier.md").read_text()
    manifest = json.loads((a / "data" / "manifest.json").read_text())
    n_val, n_test = (manifest["counts"][s]["total"] for s in ("val", "test"))
    assert f"{n_val} val images (one is {100 / n_val:.2f} points), {n_test} test images" in md
    assert "was made on the validation split; the test split only reports" in md
    assert "Chosen on validation." in md or "No variant" in md
    variants = {r["name"]: r for r in _frontier(a)["variants"]}
    assert "test_paired" in variants["int8"] and variants["int8"]["test_paired"]["with"] == "student"
    assert f"vs student on the same {n_test} test images" in md
