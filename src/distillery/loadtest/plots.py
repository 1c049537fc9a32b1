"""The load test's figure, `loadtest.png`: requests/s and p99 against concurrency per model,
the autoscaling ramp over time with its replica count, and the serving-level frontier."""

from __future__ import annotations

import io


def plot(doc: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: only when a report is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5))
    FigureCanvasAgg(fig)
    ax_tp, ax_p99, ax_time, ax_front = fig.subplots(1, 4)
    _plot_frontier(ax_front, doc.get("frontier"))
    for model in dict.fromkeys(r["model"] for r in doc["sweeps"]):
        rows = [r for r in doc["sweeps"] if r["model"] == model]
        ax_tp.plot([r["concurrency"] for r in rows], [r["throughput"] for r in rows], marker="o", label=model)
        ax_p99.plot([r["concurrency"] for r in rows], [r["p99_ms"] or 0 for r in rows], marker="o",
                    label=model)
    for ax, label in ((ax_tp, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = doc["scaling"]
    if s:
        rows = s["per_second"]
        ax_time.plot([r["second"] for r in rows], [r["throughput"] for r in rows], label="answered/s")
        ax_time.plot([r["second"] for r in rows], [r["p99_ms"] or 0 for r in rows], label="p99 ms")
        twin = ax_time.twinx()
        twin.step([t for t, _ in s["replicas"]], [n or 0 for _, n in s["replicas"]], color="black",
                  where="post", label="replicas")
        twin.set_ylabel("replicas")
        ax_time.set_xlabel("time (s)")
        ax_time.set_title(f"autoscaling ramp: {s['model']}", fontsize=9)
        ax_time.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plot_frontier(ax, frontier: list[dict] | None) -> None:
    """Accuracy against requests/s: sustained over HTTP (this test) and, for comparison, the
    model alone (1000 / its batch-1 p50 from the compression stage)."""
    if not frontier:
        ax.set_visible(False)
        return
    acc = [100 * f["test_accuracy"] for f in frontier]
    ax.scatter([f["sustained_rps"] for f in frontier], acc, label="served (p99 within target)", marker="o")
    ax.scatter([1e3 / f["model_p50_ms"] for f in frontier], acc, label="model alone, batch 1", marker="x")
    for f, a in zip(frontier, acc):
        ax.annotate(f["model"], (f["sustained_rps"], a), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("requests/s (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("serving vs model-level frontier", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
