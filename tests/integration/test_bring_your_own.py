"""Distil a model you already have, on images you have (issue: bring your own teacher and data).

A teacher trained elsewhere (torchvision's resnet18, trained by a first run) is exported to a
`torch.export` program file and imported by a second run, which distils torchvision's
mobilenet_v3_small from it on a folder of PNGs without labels (one broken file), prunes and
quantizes the mobilenet, builds a cascade whose larger model is the imported program, and
serves them on Ray Serve over HTTP. In this process (`ray.workers=0`); test_ray_train.py
distils from an imported program on Ray Train workers.
"""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port
from PIL import Image
from serving_helpers import KEY, _call, _infer_body
from torch.export import Dim

from distillery import artifacts, data
from distillery.cli.main import main
from distillery.config import ServeConfig
from distillery.serving.predictor import Predictor, catalog

TINY = str(ROOT / "configs" / "tiny.yaml")
VARIANTS = ("[{name: slim, steps: [{kind: prune_channels, mac_ratio: 1.5, round_to: 8},"
            " {kind: finetune, epochs: 1}]},"
            " {name: slim-int8, parent: slim, steps: [{kind: int8_static, calibration_samples: 64}]},"
            " {name: teacher-int8, parent: teacher, steps: [{kind: int8_static}]},"
            " {name: cascade, steps: [{kind: cascade, to: teacher}]}]")


def _settings(storage):
    return ["--config", TINY, "--set", f"storage_path={storage}", "--set", "ray.workers=0",
            "--set", "serve.enabled=false"]


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """(run directory, the first run's directory, the program file, the image folder)."""
    base = tmp_path_factory.mktemp("byo")
    elsewhere = base / "elsewhere"
    assert main(["train", "--model", "teacher", *_settings(elsewhere), "--set", "teacher.train.epochs=4",
                 "--set", "teacher.model={kind: torchvision, name: resnet18}"]) == 0
    teacher, _ = artifacts.load(elsewhere / "tiny" / "teacher")
    program = base / "resnet18.pt2"
    torch.export.save(torch.export.export(teacher, (torch.zeros(2, 1, 8, 8),),
                                          dynamic_shapes=({0: Dim("batch")},)), str(program))
    images = base / "unlabeled"  # the first run's training images as PNGs, at two depths, labels dropped
    x, _ = data.load_split(elsewhere / "tiny" / "data", "train")
    for i, image in enumerate(x):
        folder = images / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    (images / "a" / "broken.png").write_bytes(b"not an image")
    storage = base / "runs"
    assert main(["run", *_settings(storage), "--set", f"teacher.import_from={program}",
                 "--set", "student.model={kind: torchvision, name: mobilenet_v3_small}",
                 "--set", f"distill.transfer={{source: folder, path: {images}, image_shape: [1, 8, 8], "
                          "labeled: false}",
                 "--set", f"compress.variants={VARIANTS}"]) == 0
    return storage / "tiny", elsewhere / "tiny", program, x


def _stage(run, name):
    return json.loads((run / "manifest.json").read_text())["stages"][name]["metrics"]


def test_the_imported_program_is_the_run_s_teacher_verified_and_scored_as_before(byo):
    run, elsewhere, program, _ = byo
    teacher = _stage(run, "teacher")
    assert teacher["imported_from"] == str(program.resolve()) and teacher["kind"] == "exported"
    assert json.loads((run / "teacher" / "arch.json").read_text())["format"] == "exported"
    # The same network on the same test images (same data and seed): the same accuracy.
    assert teacher["test_accuracy"] == _stage(elsewhere, "teacher")["test_accuracy"]


def test_the_student_learned_from_unlabeled_images_and_the_report_says_so(byo):
    run, _, _, train_x = byo
    transfer = _stage(run, "transfer")
    assert transfer["rows"] == len(train_x) and transfer["labeled"] is False
    assert json.loads((run / "transfer" / "manifest.json").read_text())["skipped"]["count"] == 1
    assert _stage(run, "student")["kind"] == "torchvision"
    assert "**The student never saw a label**" in (run / "report.md").read_text()


def test_mobilenet_is_pruned_and_quantized_and_the_program_is_refused_as_a_parent(byo):
    run, *_ = byo
    frontier = json.loads((run / "frontier.json").read_text())
    records = {r["name"]: r for r in frontier["variants"]}
    assert {"teacher", "student", "slim", "slim-int8", "cascade"} <= records.keys()
    assert records["slim"]["macs"] < records["student"]["macs"] and \
        records["slim-int8"]["numerics"] == "int8_static"
    assert json.loads((run / "variants" / "slim-int8" / "arch.json").read_text())["format"] == "pt2e"
    assert [r["name"] for r in frontier["refused"]] == ["teacher-int8"]
    assert "imported torch.export program, a fixed graph" in frontier["refused"][0]["reason"]
    assert "teacher-int8 (teacher -> int8_static): teacher is an imported" in \
        (run / "frontier.md").read_text()


def test_the_mobilenet_variants_the_program_and_the_cascade_serve_over_http(byo):
    import ray
    from ray import serve

    from distillery.serving import serve_apps

    run, *_ = byo
    names = ["student", "slim", "slim-int8", "teacher", "cascade"]
    cfg = ServeConfig(port=free_port(), grpc_port=free_port(), models=names, auto=False, max_replicas=1,
                      batch_wait_timeout_s=0.01)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        base = serve_apps.deploy(str(run), cfg, KEY).removesuffix("/v2")
        x = data.load_split(run / "data", "test")[0][:5]
        for model in catalog(run, names):
            status, reply = _call(f"{base}/v2/models/{model.name}/infer", _infer_body(x))
            assert status == 200, (model.name, reply)
            here = Predictor(model)(x)
            served = torch.tensor(reply["outputs"][0]["data"]).reshape(5, 4)
            assert torch.allclose(served, here, atol=1e-4), model.name
    finally:
        serve.shutdown()
        ray.shutdown()
