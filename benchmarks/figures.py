"""The published figures, computed from the result files: docs/benchmarks.md and README's block.

    python benchmarks/figures.py          # write docs/benchmarks.md and README.md's figures block
    python benchmarks/figures.py --check  # exit 1 if either differs from what the results give

Reads the current results (benchmarks/results/*.json, not archive/): docs/benchmarks.md gets
one section per script with its headline figures, README.md the lines between
`<!-- figures:begin -->` and `<!-- figures:end -->` (if it has them): a few figures, each with
its machine, date, commit and file. Every figure is computed here from the JSON, never typed,
so a new result changes the docs by rerunning this script.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
CONSOLE = ("<!-- console:begin -->", "<!-- console:end -->")  # the default run's console lines
NOT_SCRIPTS = {"common", "figures"}
NOT_RUN = "## Not yet run"
STAGES = ["data", "teacher", "student_scratch", "student", "evaluate", "compress", "serve", "report"]

Result = dict[str, Any]
Found = tuple[Path, Result]


# --- reading -------------------------------------------------------------------------------

def current() -> list[Found]:
    """(path, result) of every current result, sorted by file name."""
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]


def scripts() -> list[str]:
    """The benchmark scripts: every benchmarks/*.py but the shared modules."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_SCRIPTS)


def newest(results: list[Found], script: str, variant: str | None = None) -> Found | None:
    """The most recent current result of `script` (any machine), or None."""
    found = [(p, r) for p, r in results
             if r["meta"]["script"] == script and r["meta"].get("variant") == variant]
    return max(found, key=lambda pr: pr[1]["meta"]["date"], default=None)


# --- formatting ----------------------------------------------------------------------------

def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pct(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}%}"


def pts(x: float) -> str:
    return f"{x * 100:+.2f} pt"


def ci(low: float, high: float) -> str:
    """A 95% interval of a difference, in points."""
    return f"{low * 100:+.2f} to {high * 100:+.2f}"


def acc_ci(acc: float, interval: list[float] | None) -> str:
    return pct(acc) + (f" ({interval[0]:.1%}-{interval[1]:.1%})" if interval else "")


def num(x: float) -> str:
    return f"{x:,.0f}"


def x(ratio: float, digits: int = 1) -> str:
    return f"{ratio:.{digits}f}x"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def median(values: list[float]) -> float:
    """The middle round, as the scripts report it (odd counts of rounds)."""
    return sorted(values)[len(values) // 2]


def machine_text(meta: Result) -> str:
    m = meta["machine"]
    return m["gpu"] or f"{re.sub(r'[(](R|TM)[)]', '', m['cpu'])}, {m['cores']} cores"


def commit_text(meta: Result) -> str:
    c = meta["commit"]
    if not c.get("hash"):
        return "commit not recorded"
    return f"`{c['hash']}`" + (" with uncommitted changes" if c.get("dirty") else "")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- one section per script: a result -> its headline figures as Markdown -------------------

def default_run(r: Result) -> str:
    rec = r["recommended"]["name"]
    rows = [[f"**{name}** (recommended)" if name == rec else name, m["role"],
             acc_ci(m["test_accuracy"], m["interval"]), num(m["params"]), f"{m['p50_ms']:.3f}",
             num(m["throughput"])] for name, m in r["models"].items()]
    stages = sorted(r["stages_s"].items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else 99)
    timing = f"Whole run {minutes(r['wall_s'])}" if r.get("wall_s") else "Not timed"
    if r.get("to_url_s"):
        timing += f", serving URL after {minutes(r['to_url_s'])}"
    lines = [table(["model", "role", "test acc (95% CI)", "params", "p50 ms at batch 1",
                    "images/s at batch 256"], rows), "",
             timing + "; stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages) + ".",
             "", f"Recommended: {r['recommended']['reason']}"]
    if r.get("served_c32"):
        lines += ["", "Served at concurrency 32 by the run's own load test (requests/s): "
                  + ", ".join(f"{k} {num(v)}" for k, v in r["served_c32"].items()) + "."]
    return "\n".join(lines + ["", "![frontier of the default run](assets/frontier.png)"])


def distill_seeds(r: Result) -> str:
    rows = []
    for backend, settings in r["results"].items():
        for setting, s in settings.items():
            m = s["mean"]
            interval = m.get("mean_gain_interval")  # absent from results older than the interval
            gain = pts(m["gain"]) + (f" ({ci(*interval)})" if interval else "")
            pooled = m["gain"] / m["gap"] if m["gap"] else float("nan")  # mean gain over mean gap
            rows.append([backend, setting, m["seeds"], pct(m["teacher"]), pct(m["student_scratch"]),
                         pct(m["student"]), gain, pct(pooled, 0)])
    header = ["training", "student", "seeds", "teacher", "alone", "distilled", "gain (95% CI)",
              "gap closed (pooled)"]
    return table(header, rows) + "\n\nTest accuracy, mean over seeds (360 test images: one is 0.28 pt)."


def compression(r: Result) -> str:
    d, c, slim = r["digits"], r["cifar_shaped"], r["digits"]["teacher_slim"]
    rows = [[f"digits: recommended ({d['recommended']}, {pct(d['recommended_test_accuracy'])}; teacher "
             f"{pct(d['teacher_test_accuracy'])}) / teacher fp32 eager, images/s at batch 256",
             x(d["throughput_ratio_vs_teacher_eager"], 0)],
            ["the same, p50 latency at batch 1", x(d["batch1_speedup_vs_teacher_eager"])],
            [f"teacher-slim ({x(slim['mac_ratio'], 2)} fewer MACs) / compiled teacher, batch 256",
             x(slim["speedup_b256"], 2)],
            ["CIFAR-shaped student: int8 static / its fp32 eager, batch 256",
             x(c["int8_vs_fp32_eager_b256"])],
            ["int8 static / torchao's default int8 path, batch 256 / batch 1",
             f"{x(c['int8_vs_torchao_default_b256'])} / {x(c['int8_vs_torchao_default_b1'], 2)}"]]
    return table(["figure (1 torch thread, medians of repeats)", "speed-up"], rows)


def compression_seeds(r: Result) -> str:
    parents = {k: v["parent"] for k, v in r["per_seed"][0]["drops"].items()}
    rows = [[name, parents.get(name, "teacher"), pts(s["mean"]), ci(*s["interval"]), s["verdict"]]
            for name, s in r["summary"].items()]
    header = ["variant", "compared with", f"mean over {len(r['seeds'])} seeds", "95% interval (pt)",
              "verdict"]
    return table(header, rows) + "\n\nTest accuracy of each variant minus its parent's, same images per seed."


def serving(r: Result) -> str:
    t, q = {k: v["throughput"] for k, v in r["runs"].items()}, r["ratios"]

    def ingress(c: int) -> str:
        return f"{num(t[f'haproxy noop c{c}'])} / {num(t[f'proxy noop c{c}'])} " \
               f"({x(q[f'haproxy_vs_proxy_noop_c{c}'])})"
    rows = [["no-op, concurrency 1: HAProxy / Ray's proxy (requests/s)", ingress(1)],
            ["no-op, concurrency 32: HAProxy / Ray's proxy", ingress(32)],
            ["digits student through HAProxy, concurrency 1 / 32 (requests/s)",
             f"{num(t['haproxy student c1'])} / {num(t['haproxy student c32'])}"],
            ["student at concurrency 1 as a share of the no-op (model-only bound)",
             f"{pct(q['haproxy_student_vs_noop_c1'], 0)} ({pct(q['student_c1_bound_vs_noop'], 0)})"],
            ["CIFAR-shaped student / teacher at concurrency 32: binary tensors / JSON",
             f"{x(q['cifar_student_vs_teacher_c32_binary'])} / {x(q['cifar_student_vs_teacher_c32'])}"],
            ["64-image requests, share of the in-process rate: binary / JSON",
             f"{pct(q['x64_binary_images_vs_in_process'], 0)} / "
             f"{pct(q['x64_json_images_vs_in_process'], 0)}"],
            ["batching on / off, CIFAR-shaped teacher (in process, batch 32 / 1)",
             f"{x(q['cifar_teacher_batching_on_vs_off_c32'], 2)} "
             f"({x(q['cifar_teacher_batching_bound_in_process'], 2)})"]]
    return table([f"figure (1 replica, 0.5 CPU; load from {r['load_tool']})", "value"], rows)


def grpc_http(r: Result) -> str:
    rows = []
    for images in (1, 64):
        for c in (1, 32):
            rate = {p: r["runs"][f"{p} x{images} c{c}"]["throughput"]
                    for p in ("http-json", "http-binary", "grpc")}
            best_http = max(rate["http-json"], rate["http-binary"])
            rows.append([f"{images} image(s), concurrency {c}", *(num(v) for v in rate.values()),
                         x(rate["grpc"] / best_http, 2)])
    return table(["requests/s", "HTTP, JSON", "HTTP, binary", "gRPC", "gRPC / best HTTP"], rows)


def cascade(r: Result) -> str:
    rows = [[f"{c['name']} ({c['small']} -> {c['large']})", pct(c["accuracy"]), pct(c["large_accuracy"]),
             pct(c["escalation"], 1), f"{c['mean_ms']:.3f}", f"{c['large_mean_ms']:.3f}",
             x(c["large_mean_ms"] / c["mean_ms"])] for c in r["cascades"]]
    header = ["cascade", "test acc", "large alone", "escalated", "ms/image", "large ms/image", "speed-up"]
    return table(header, rows) + \
        f"\n\nBatch 1 over the {r['test_images']} test images, median of {r['repeats']} passes."


def adaptive(r: Result) -> str:
    reps = r["repeats"]
    top, fastest = reps[0]["top"], reps[0]["fastest"]
    rows = [[model, ", ".join(pct(rep["runs"][model]["seconds_within_slo"], 0) for rep in reps),
             ", ".join(f"{rep['runs'][model]['p99_ms']:.0f}" for rep in reps)] for model in reps[0]["runs"]]
    valid = [v for v in r["target_met"] if v != "beyond every model"]
    header = ["sent to", f"seconds within p99 <= {reps[0]['slo_ms']:.0f} ms (per repeat)",
              "p99 ms (per repeat)"]
    return "\n".join([
        table(header, rows), "",
        f"`auto`'s targets met in {valid.count('met')} of {len(valid)} repeats "
        f"({len(r['target_met']) - len(valid)} beyond every model, not counted). "
        f"First low-load step answered by {top} through `auto`: "
        + ", ".join(pct(rep["runs"]["auto"]["low_load_share_top"], 0) for rep in reps) + ". Capacities: "
        + ", ".join(f"{num(rep['capacity_rps'])} / {num(rep['fastest_capacity_rps'])}" for rep in reps)
        + f" requests/s ({top} / {fastest})."])


def metrics_cost(r: Result) -> str:
    rps, p99 = r["requests_per_s"], r["p99_ms"]
    rows = [[k, num(rps[k]), f"{p99[k]:.1f}"] for k in rps]
    on, again, us = r["on_to_off"], r["off2_to_off"], r["in_process_us_per_request"]
    return "\n".join([table(["serve.metrics", "requests/s (median)", "p99 ms (median)"], rows), "",
                      f"Metrics on / off per round: {on[0]:.3f}x ({on[1]:.3f} to {on[2]:.3f}, 95%); the two "
                      f"identical replicas without: {again[0]:.3f}x ({again[1]:.3f} to {again[2]:.3f}). "
                      f"In process: {us['on']:.1f} against {us['off']:.1f} us a request."])


def top_vs_hey(r: Result) -> str:
    rows = [[c["concurrency"], num(c["hey_rps"]), num(c["top_rps"]), f"{c['top_rps'] / c['hey_rps']:.3f}",
             f"{c['top_rps'] / c['hey_same_seconds_rps']:.4f}", f"{c['naive_rps'] / c['hey_rps']:.3f}"]
            for c in r["rounds"]]
    ratio, naive, same = r["top_to_hey"], r["naive_to_hey"], r["top_to_hey_same_seconds"]
    return "\n".join([table(["concurrency", "hey requests/s", "top requests/s", "top / hey",
                             "top / hey in the same seconds", "over the scrapes' times / hey"], rows), "",
                      f"top / hey in the same seconds: {same[0]:.4f}x ({same[1]:.4f} to {same[2]:.4f}, 95%). "
                      f"top / hey: {ratio[0]:.3f}x ({ratio[1]:.3f} to {ratio[2]:.3f}, 95%); the worst round "
                      f"{pct(r['worst_abs_error'], 1)} off (target: within 10%). A rate over the scrapes' "
                      "own "
                      f"times: {naive[0]:.3f}x ({naive[1]:.3f} to {naive[2]:.3f})."])


def cluster_rig(r: Result) -> str:
    rows = [["cluster: client -> head's HAProxy -> replicas on 2 worker machines",
             num(median(r["cluster_rps"]))],
            ["one machine: local Ray", num(median(r["one_machine_rps"]))],
            ["cluster / one machine (target >= 0.80)", f"{r['ratio']:.2f}"]]
    return table([f"requests/s, {r['model']}, {r['concurrency']} clients, median of {len(r['cluster_rps'])} "
                  f"rounds of {r['duration_s']:.0f} s", "value"], rows)


def train_scaling(r: Result) -> str:
    rows = [[name, f"{v['train_loop_s']:.2f}", f"{v['stage_wall_s']:.1f}", pct(v["test_accuracy"])]
            for name, v in r["variants"].items()]
    q = r["ratios"]["median"]
    return table(["training", "train loop per epoch (s, median)", "stage wall (s)", "test acc"], rows) + (
        f"\n\nRay, 1 worker / plain process: {x(q['ray1_vs_plain_train_loop'], 2)} per epoch, "
        f"{x(q['ray1_vs_plain_stage_wall'])} for the stage; 2 DDP workers / 1: "
        f"{x(q['ddp_speedup_2_vs_1_workers'], 2)} as fast; FSDP {x(q['fsdp_vs_ddp_epoch'], 2)} and pipeline "
        f"{x(q['pipeline_vs_ddp_epoch'], 2)} the DDP epoch.")


def search(r: Result) -> str:
    rows = [[s["seed"], pct(s["teacher"]), pct(s["alone"]), pct(s["distilled"]), pct(s["searched"]),
             pct(s["gap_closed"], 0), s["searched_recipe"]] for s in r["gap_closed"]]
    m = r["mean"]
    rows.append(["**mean**", pct(m["teacher"]), pct(m["alone"]), pct(m["distilled"]), pct(m["searched"]),
                 pct(m["gap_closed_pooled"], 0) + " pooled", ""])
    text = table(["seed", "teacher", "student alone", "distilled", "searched", "gap closed", "chosen"], rows)
    d = r.get("default_search")
    if d:
        s, chosen = d["summary"], d["searched"]
        text += (f"\n\nDefault search (seed {r['seeds'][0]}): {d['search_seconds']:.0f} s, {s['trials']} "
                 f"trials ({s['stopped_early']} stopped early), {pct(s['epochs_saved'], 0)} of the epochs "
                 f"saved; chose {chosen['recipe']}, test {pct(chosen['test_accuracy'])}, p50 "
                 f"{chosen['p50_ms']:.3f} ms.")
    return text


def unlabeled(r: Result) -> str:
    seeds, rows = r["per_seed"], []
    for v in r["variants"]:
        diffs = [s[v]["vs_labeled"] for s in seeds] if "vs_labeled" in seeds[0][v] else []
        rows.append([v, pct(sum(s[v]["student"] for s in seeds) / len(seeds)),
                     pts(sum(diffs) / len(diffs)) if diffs else "-",
                     ", ".join(f"{d * 100:+.2f}" for d in diffs) or "-"])
    return table(["distilled student", f"test acc (mean of {len(seeds)} seeds)", "vs labeled (mean)",
                  "vs labeled per seed (pt)"], rows)


def imported(r: Result) -> str:
    rows = [[f"seed {seed}: {way}", pct(v["student"]), pts(v["vs_in_run"]) if "vs_in_run" in v else "-",
             {True: "yes", False: "no"}.get(v.get("identical_predictions"), "-")]
            for seed, s in zip(r["seeds"], r["per_seed"]) for way, v in s.items()]
    header = ["teacher taken from", "distilled student's test acc", "vs the run's own", "same predictions"]
    return table(header, rows)


def reliability(r: Result) -> str:
    rows = [[name, pct(v["test_accuracy"]), v["killed_after_checkpoint"] or "-", v["resumed_from"] or "-",
             v["finished_epochs_redone"], f"{v['seconds']:.1f}"] for name, v in r["runs"].items()]
    return table([f"{r['which']}, 30 epochs", "test acc", "killed after checkpoint", "resumed from",
                  "finished epochs redone", "wall s"], rows)


def storage(r: Result) -> str:
    rows = [[name, f"{v['fresh_s']:.1f}", f"{v['rerun_s']:.1f}", pct(v["test_accuracy"])]
            for name, v in r["runs"].items()]
    return table(["storage_path", "fresh run (s)", "re-run, all done (s)", "student test acc"], rows) + \
        f"\n\nThe bucket held {r['bucket_mib']} MiB after a run."


def gpu_check(r: Result) -> str:
    rows = [[f"strategy {s['strategy']}, 5 steps on CUDA (NCCL)",
             "loss fell" if s["loss_fell"] else "loss rose"] for s in r["strategies"]]
    rows += [[f"digits teacher in process, {'bf16' if t['bf16'] else 'fp32'}",
              f"{pct(t['test_accuracy'])} test, {t['stage_seconds']:.1f} s, "
              f"{num(t['median_samples_per_s'])} samples/s"] for t in r["teacher"]]
    return table([f"check on {r['gpu']} (torch {r['torch']})", "result"], rows)


# Section order on the page: the default run first, then training, compression, serving, the rest.
SECTIONS: dict[str, Callable[[Result], str]] = {
    "default_run": default_run, "distill_seeds": distill_seeds, "search": search, "unlabeled": unlabeled,
    "imported": imported, "train_scaling": train_scaling, "reliability": reliability,
    "gpu_check": gpu_check, "compression": compression, "compression_seeds": compression_seeds,
    "cascade": cascade, "serving": serving, "grpc_http": grpc_http, "adaptive": adaptive,
    "metrics_cost": metrics_cost, "top_vs_hey": top_vs_hey, "cluster_rig": cluster_rig, "storage": storage}


# --- README's block: a few headline figures, each from the newest result of its script ------

def _accuracies(r: Result) -> str:
    return " / ".join(acc_ci(r["models"][m]["test_accuracy"], r["models"][m]["interval"])
                      for m in ("teacher", "student_scratch", "student"))


def _recommended(r: Result) -> str:
    name = r["recommended"]["name"]
    times = [minutes(r[k]) for k in ("to_url_s", "wall_s") if r.get(k)]
    return f"{name} ({pct(r['models'][name]['test_accuracy'])} test); " + " / ".join(times)


def _seeds_gain(r: Result) -> str:
    m = r["results"]["in-process"]["no augmentation (preset)"]["mean"]
    return f"{pts(m['gain'])} (95% CI {ci(*m['mean_gain_interval'])}), {m['seeds']} seeds"


def _compression(r: Result) -> str:
    d = r["digits"]
    return f"{x(d['throughput_ratio_vs_teacher_eager'], 0)} / {x(d['batch1_speedup_vs_teacher_eager'])}"


def _serving(r: Result) -> str:
    t = {k: v["throughput"] for k, v in r["runs"].items()}
    return f"{num(t['haproxy noop c32'])} / {num(t['proxy noop c32'])} " \
           f"({x(r['ratios']['haproxy_vs_proxy_noop_c32'])})"


def _adaptive(r: Result) -> str:
    top = r["repeats"][0]["top"]
    per = {m: ", ".join(pct(rep["runs"][m]["seconds_within_slo"], 0) for rep in r["repeats"])
           for m in ("auto", top)}
    return f"`auto` {per['auto']}; {top} alone {per[top]}"


def _cluster(r: Result) -> str:
    return f"{num(median(r['cluster_rps']))} / {num(median(r['one_machine_rps']))} ({r['ratio']:.2f})"


def _metrics(r: Result) -> str:
    on = r["on_to_off"]
    return f"{on[0]:.3f}x ({on[1]:.3f} to {on[2]:.3f})"


def _top(r: Result) -> str:
    ratio = r["top_to_hey"]
    worst = pct(r["worst_abs_error"], 1)
    return f"{ratio[0]:.3f}x ({ratio[1]:.3f} to {ratio[2]:.3f}); worst round {worst} off"


# (script, variant, figure, its value from the result)
HEADLINES: list[tuple[str, str | None, str, Callable[[Result], str]]] = [
    ("default_run", None, "`distillery run`: teacher / student alone / distilled, test accuracy (95% CI)",
     _accuracies),
    ("default_run", None, "`distillery run`: recommended model; serving URL after / whole run", _recommended),
    ("distill_seeds", None, "distilled student minus the same student trained alone, test accuracy",
     _seeds_gain),
    ("compression", None, "recommended variant / the teacher (fp32 eager): images/s at batch 256 / batch 1",
     _compression),
    ("serving", None, "requests/s through HAProxy / Serve's proxy (no-op model, concurrency 32)", _serving),
    ("adaptive", None, "seconds within a 100 ms p99 under rising load, per repeat", _adaptive),
    ("cluster_rig", None, "requests/s from a client of a 3-machine cluster / on one machine", _cluster),
    ("metrics_cost", None, "requests/s with replica metrics on / off (95% interval)", _metrics),
    ("top_vs_hey", None, "`distillery top`'s requests/s / hey's for the same load (95% interval)", _top),
]


def readme_block(results: list[Found]) -> str:
    rows = []
    for script, variant, figure, value in HEADLINES:
        found = newest(results, script, variant)
        if found:
            path, r = found
            m = r["meta"]
            rows.append([figure, value(r), f"{machine_text(m)}, {m['date']}, {commit_text(m)}",
                         f"[{path.name}]({rel(path)})"])
    return "\n".join([table(["figure", "value", "measured on", "result"], rows), "",
                      "Computed by `python benchmarks/figures.py` from `benchmarks/results/`; every script's "
                      "figures: [docs/benchmarks.md](docs/benchmarks.md)."])


# --- docs/benchmarks.md --------------------------------------------------------------------

INTRO = """# Benchmarks

What the scripts in `benchmarks/` measured, computed from their result files in
`benchmarks/results/` by `python benchmarks/figures.py` (do not edit this page by hand: rerun
that). Each section is one script; each result names the machine, the date, the code (commit)
and its file, which also holds the arguments, the library versions and every figure behind the
headline ones. How to run each script, and how long it takes: `benchmarks/README.md`.
Superseded runs are in `benchmarks/results/archive/` and are not quoted here."""


def purpose(script: str) -> str:
    """What the script measures: the first sentence of its docstring (up to its first colon when
    that sentence runs long)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{script}.py").read_text())) or ""
    sentence = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".:")
    sentence = sentence.split(": ")[0] if len(sentence) > 200 else sentence
    return sentence if sentence.endswith("?") else sentence + "."


def result_text(path: Path, r: Result) -> str:
    m = r["meta"]
    render = SECTIONS.get(m["script"])
    body = render(r) if render else "No headline figures are defined for this script yet (see figures.py)."
    args = "arguments not recorded" if m.get("args") is None else \
        f"`python benchmarks/{m['script']}.py{''.join(' ' + a for a in m['args'])}`"
    return f"{body}\n\n{machine_text(m)}, {m['date']}, {commit_text(m)}; {args}; `{rel(path)}`."


def docs_page(results: list[Found]) -> str:
    parts, by_script = [INTRO], {}
    # Within a script: its default setting before its variants, then by machine.
    for path, r in sorted(results, key=lambda pr: (pr[1]["meta"].get("variant") or "", pr[0].name)):
        by_script.setdefault(r["meta"]["script"], []).append((path, r))
    order = [s for s in SECTIONS if s in by_script] + sorted(set(by_script) - set(SECTIONS))
    for script in order:
        known = (HERE / f"{script}.py").is_file()
        parts.append(f"## {script}\n\n{purpose(script)}" if known else f"## {script}")
        for path, r in by_script[script]:
            if len(by_script[script]) > 1:  # a variant, or another machine
                parts.append(f"### {path.stem.rsplit('_', 2)[0]}, {machine_text(r['meta'])}")
            parts.append(result_text(path, r))
    missing = [s for s in scripts() if s not in by_script]
    if missing:
        parts.append(f"{NOT_RUN}\n\n" + "\n".join(f"- `{s}`: {purpose(s)}" for s in missing))
    return "\n\n".join(parts) + "\n"


# --- main ----------------------------------------------------------------------------------

def with_block(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """README's text with the lines between the markers replaced by `block`."""
    head, _, rest = readme.partition(begin + "\n")
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{block}\n{end}{tail}"


# The default run's console, as the README shows it: the lines a user sees first, the run's
# temp storage shown as the default `runs/`, a line too long for the page cut at a word.
CONSOLE_LINES = ("logs:", "[data] digits", "[teacher] resnet", "[teacher] test", "[student_scratch] cnn",
                 "[student_scratch] test", "[student] cnn", "[student] test", "[compress] recommended",
                 "[serve] ingress", "[serve] running in", "[serve] auto", "[loadtest] ", "[report] runs",
                 "serving ")


def console_block(results: list[Found]) -> str:
    found = newest(results, "default_run")
    if not found:
        return "```\n(no default run recorded: python benchmarks/default_run.py)\n```"
    lines = []
    for line in found[1]["console"]:
        text = re.sub(r"^\s*[\d.]+ s  ", "", line)
        text = re.sub(r"/tmp/default-run-[^/\s]+/", "runs/", text)
        text = re.sub(r"\(/\S+/site-packages/", "(…/site-packages/", text)
        if text.startswith(CONSOLE_LINES) and not re.match(r"\[loadtest\] \d+/", text):
            lines.append(text if len(text) <= 110 else text[:text.rfind(" ", 0, 104)] + " ...")
    return "```\n" + "\n".join(lines) + "\n```"


def outputs() -> dict[Path, str]:
    """Each file this script writes (or writes a block of) -> the text it should have."""
    results = current()
    out = {DOCS: docs_page(results)}
    readme = README.read_text() if README.is_file() else ""
    if BEGIN + "\n" in readme and END in readme:
        readme = with_block(readme, readme_block(results))
        if CONSOLE[0] + "\n" in readme and CONSOLE[1] in readme:
            readme = with_block(readme, console_block(results), *CONSOLE)
        out[README] = readme
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a written file is out of date")
    args = parser.parse_args()
    wanted = outputs()
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {rel(path)} (run python benchmarks/figures.py)")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
