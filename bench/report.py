"""The bench's results as the README shows them: a Markdown table with ratios and goals, and one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PEER_ORDER = ("cxr-stream", "kafka-consumer", "spark-predict-batch-udf", "spark-load-per-batch", "plain-loop")


def _run(results: dict[str, Any], peer: str, model: str) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if r["peer"] == peer and r["model"] == model), None)


def _ratio(results: dict[str, Any], model: str, peer: str) -> float | None:
    ours, theirs = _run(results, "cxr-stream", model), _run(results, peer, model)
    if not ours or not theirs or not theirs.get("throughput"):
        return None
    return float(ours["throughput"]) / float(theirs["throughput"])


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) for each goal of the performance issue that this run measured."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def ratio_goal(model: str, peer: str, target: float) -> None:
        ratio = _ratio(results, model, peer)
        if ratio is not None:
            rows.append((f"{model}: throughput vs {peer}", f"≥ {target:.2f}x", f"{ratio:.2f}x", ratio >= target))

    ratio_goal("demo", "kafka-consumer", 1.0)
    ratio_goal("demo", "plain-loop", 0.9)
    ratio_goal("demo", "spark-predict-batch-udf", 1.05)
    ratio_goal("demo", "spark-load-per-batch", 2.5)
    ratio_goal("tiny", "plain-loop", 0.9)
    ceiling = results.get("ceilings", {}).get("densenet121")
    ours = _run(results, "cxr-stream", "densenet121")
    if ceiling and ours:
        share = ours["throughput"] / ceiling["ceiling"]
        rows.append(("densenet121: share of the compute ceiling", "≥ 0.95", f"{share:.2f}", share >= 0.95))
    demo = _run(results, "cxr-stream", "demo")
    if demo and demo.get("latency"):
        p99 = demo["latency"]["50%"]["p99"]
        rows.append(("demo: p99 end to end at 50 % load", "≤ 1 s", f"{p99:.2f} s", p99 is not None and p99 <= 1.0))
    if demo and demo.get("first_result_after_ready_s") is not None:
        first = demo["first_result_after_ready_s"]
        rows.append(("demo: first result after the query starts", "≤ 5 s", f"{first:.1f} s", first <= 5.0))
    if demo:
        rss = demo["peak_python_rss_mb"]
        rows.append(("demo: peak RSS of a Python worker", "≤ 1.5 GB", f"{rss / 1024:.2f} GB", rss <= 1536))
    scaling = results.get("scaling") or {}
    if scaling.get("one_core"):
        gain = scaling["all_cores"] / scaling["one_core"]
        cores = results["machine"]["cores"]
        rows.append((f"demo: throughput on {cores} cores vs 1", "≥ 1.8x", f"{gain:.2f}x", gain >= 1.8))
    return rows


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, PySpark {m['pyspark']}; {m['date']}.",
        "",
        "| model | peer | images/s | cxr-stream ÷ peer | p50 / p99 at 50 % (s) | p50 / p99 at 90 % (s) "
        "| first result (s) | peak RSS tree / Python (MB) |",
        "|---|---|---:|---:|---|---|---:|---|",
    ]
    models = list(dict.fromkeys(r["model"] for r in results["runs"]))
    for model in models:
        for peer in PEER_ORDER:
            run = _run(results, peer, model)
            if run is None:
                continue
            ratio = _ratio(results, model, peer)
            lat = run.get("latency") or {}

            def pair(load: str, lat: dict[str, Any] = lat) -> str:
                figures = lat.get(load)
                if not figures or figures["p50"] is None:
                    return "-"
                lost = f" ({figures['unanswered']} late)" if figures.get("unanswered") else ""
                return f"{figures['p50']:.2f} / {figures['p99']:.2f}{lost}"

            first = run.get("first_result_s")
            lines.append(
                f"| {model} | {peer} | {run['throughput']:.1f} | {f'{ratio:.2f}x' if ratio else '-'} | "
                f"{pair('50%')} | {pair('90%')} | {f'{first:.1f}' if first else '-'} | "
                f"{run['peak_rss_mb']} / {run['peak_python_rss_mb']} |"
            )
    ceilings = results.get("ceilings") or {}
    if ceilings:
        lines += [
            "",
            "| model | preprocessing, 1 thread (ms/image) | inference, 1 thread (ms/image) | ceiling (images/s) |",
        ]
        lines.append("|---|---:|---:|---:|")
        for model, c in ceilings.items():
            lines.append(
                f"| {model} | {c['preprocess_s_per_image'] * 1000:.1f} | {c['inference_s_per_image'] * 1000:.1f} "
                f"| {c['ceiling']:.1f} |"
            )
    rows = goals(results)
    if rows:
        lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
        lines += [f"| {g} | {t} | {v} | {'yes' if ok else 'no'} |" for g, t, v, ok in rows]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results["runs"]))
    peers = [p for p in PEER_ORDER if any(r["peer"] == p for r in results["runs"])]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        runs = [(_run(results, p, model), p) for p in peers]
        present = [(r, p) for r, p in runs if r is not None]
        ax = axes[0][col]
        ax.bar(
            range(len(present)),
            [r["throughput"] for r, _ in present],
            color=["C0" if p == "cxr-stream" else "C7" for _, p in present],
        )
        ax.set_xticks(range(len(present)), [p.replace("spark-", "spark\n") for _, p in present], fontsize=7)
        ax.set_title(f"{model}: images/s")
        ceiling = (results.get("ceilings") or {}).get(model)
        if ceiling:
            ax.axhline(ceiling["ceiling"], color="C3", linestyle="--", linewidth=1, label="compute ceiling")
            ax.legend(fontsize=7)
        ax = axes[1][col]
        streamed = [(r, p) for r, p in present if r.get("latency")]
        for i, (run, _peer) in enumerate(streamed):
            for j, load in enumerate(("50%", "90%")):
                figures = run["latency"][load]
                if figures["p50"] is None:
                    continue
                x = i + (j - 0.5) * 0.35
                ax.bar(x, figures["p99"], width=0.33, color="C1" if j else "C2", alpha=0.35)
                ax.bar(x, figures["p50"], width=0.33, color="C1" if j else "C2")
        ax.set_xticks(range(len(streamed)), [p.replace("spark-", "spark\n") for _, p in streamed], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{model}: latency s (p50 solid, p99 light;\ngreen 50 % load, orange 90 %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
