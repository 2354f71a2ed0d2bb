"""Study reports: the cost model calibrated on the measured runs, a markdown table, JSON and PNG plots.

Calibration (stated in every report): compute and data time per sample come from
the smallest successful rank count; the fraction of the gradient reduction that
backward hides comes from the next one (what communication added to its step,
against what the model says the reduction costs: its exposure, above 1 where the
reduction also slows compute). Every other rank count is a
prediction, and its error against the measurement is reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import model as cost_model


def node_shape(ranks: int, per_node: int) -> tuple[int, int]:
    """(nodes, ranks per node) when nodes hold per_node ranks (0: everything on one node)."""
    if not per_node or ranks <= per_node:
        return 1, ranks
    return math.ceil(ranks / per_node), per_node


def calibrate(model: cost_model.Model, rows: list[dict], parameters: int, bucket_bytes: int, cores: int,
              per_node: int, node_shared: bool = False) -> tuple[cost_model.Workload | None, dict]:
    """A Workload fitted to the measured rows, and which rows it was fitted on.

    The optimizer update is taken out of the base run's compute (a cost per step, which
    node-shared data parallel and ZeRO divide among ranks) when that run was on one rank.
    """
    ok = [r for r in rows if "step_ms" in r]
    if not ok:
        return None, {}
    base = ok[0]
    _, base_q = node_shape(base["ranks"], per_node)
    slow = max(1.0, base_q / cores)
    update_ms = (base.get("update_ms") or 0.0) if base["ranks"] == 1 else 0.0
    work = cost_model.Workload(
        parameters=parameters,
        compute_s_per_sample=(base["compute_ms"] - update_ms) / 1e3 / base["per_rank_batch"] / slow,
        batch_per_rank=base["per_rank_batch"], data_s_per_sample=base["data_ms"] / 1e3 / base["per_rank_batch"],
        bucket_bytes=bucket_bytes, cores_per_node=cores, backward_fraction=base.get("backward_fraction") or 2 / 3,
        update_s=update_ms / 1e3 / slow, node_shared=node_shared)
    used = {"compute": base["ranks"]}
    multi = next((r for r in ok if r["ranks"] > 1), None)
    if multi is not None:
        nodes, q = node_shape(multi["ranks"], per_node)
        batch = multi["per_rank_batch"]
        hidden = cost_model.predict(model, _with(work, exposure=0.0, batch_per_rank=batch), nodes, q)
        exposed = cost_model.predict(model, _with(work, exposure=1.0, batch_per_rank=batch), nodes, q)
        reducible = exposed["exposed_s"] - hidden["exposed_s"]  # the part backward could hide
        added = multi["step_ms"] / 1e3 - hidden["step_s"]
        if reducible > 0:
            work.exposure = max(0.0, added / reducible)
        if work.exposure > 1:  # more than the whole reduction: the rest is waiting for the slower rank
            work.skew = (added - reducible) / hidden["compute_s"]
            work.exposure = 1.0
        used["exposure"] = multi["ranks"]
    return work, used


def add_predictions(model, work, rows: list[dict], per_node: int, stage: int = 0) -> None:
    for row in rows:
        nodes, q = node_shape(row["ranks"], per_node)
        predicted = cost_model.predict(model, _with(work, batch_per_rank=row["per_rank_batch"]), nodes, q, stage)
        row["predicted_ms"] = predicted["step_s"] * 1e3
        row["predicted_algorithm"] = predicted["algorithm"]
        if "step_ms" in row:
            row["error"] = (row["predicted_ms"] - row["step_ms"]) / row["step_ms"]


def predictions(model, work, ranks: list[int], nodes_of: int, mode: str, base_batch: int, base_ranks: int,
                stage: int = 0) -> list[dict]:
    """Predicted rows for rank counts beyond the measured ones (node shape nodes_of)."""
    def batch(p):  # per rank: fixed (weak), or the base run's global batch split p ways (strong)
        return base_batch if mode == "weak" else base_batch * base_ranks / p

    out = [cost_model.predict(model, _with(work, batch_per_rank=batch(p)), *node_shape(p, nodes_of), stage)
           for p in ranks]
    one = cost_model.predict(model, _with(work, batch_per_rank=batch(1)), 1, 1, stage)
    for row in out:
        if mode == "weak":
            row["efficiency"] = one["step_s"] / row["step_s"]
        else:
            row["efficiency"] = one["step_s"] / (row["step_s"] * row["ranks"])
    return out


def _with(work, **changes):
    from dataclasses import replace

    return replace(work, **changes)


def _ms(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def markdown(rows: list[dict], per_node: int) -> str:
    lines = ["| ranks | nodes x ranks | status | step ms | samples/s | speedup | efficiency | compute ms | "
             "exposed comm ms | data ms | predicted ms | error |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nodes, q = node_shape(r["ranks"], per_node)
        shape = f"{nodes} x {q}" + (" (oversubscribed)" if r.get("oversubscribed") else "")
        if "step_ms" in r:
            cells = [r["status"], _ms(r["step_ms"]), f"{r['samples_per_s']:.0f}", f"{r['speedup']:.2f}",
                     f"{100 * r['efficiency']:.1f}%", _ms(r["compute_ms"]), _ms(r["exposed_ms"]), _ms(r["data_ms"]),
                     _ms(r.get("predicted_ms")), f"{100 * r['error']:+.1f}%" if "error" in r else "-"]
        else:
            cells = [f"{r['status']}: {r.get('detail', '')} (log: {r.get('log', '')})", *["-"] * 7,
                     _ms(r.get("predicted_ms")), "-"]
        lines.append("| " + " | ".join([str(r["ranks"]), shape, *cells]) + " |")
    return "\n".join(lines)


def prediction_markdown(rows: list[dict]) -> str:
    lines = ["| ranks | nodes x ranks | algorithm | comm ms | exposed ms | compute ms | step ms | efficiency |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['nodes']} x {r['per_node']} | {r['algorithm']} | {1e3 * r['comm_s']:.2f} | "
                     f"{1e3 * r['exposed_s']:.2f} | {1e3 * r['compute_s']:.2f} | {1e3 * r['step_s']:.2f} | "
                     f"{100 * r['efficiency']:.1f}% |")
    return "\n".join(lines)


def plots(rows: list[dict], predicted: list[dict], out: Path, title: str) -> list[str]:
    """speedup.png, efficiency.png and time_split.png; [] with nothing written where matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if "step_ms" in r]
    ranks = [r["ranks"] for r in ok]
    written = []

    every = sorted(set(ranks) | {r["ranks"] for r in predicted})
    curves = [(every, every, "k--", "ideal")] if every else []
    if ok:
        curves.append((ranks, [r["speedup"] for r in ok], "o-", "measured"))
    if predicted:
        curves.append(([r["ranks"] for r in predicted], [r["efficiency"] * r["ranks"] for r in predicted], "s:",
                       f"predicted (nodes of {predicted[-1]['per_node']})"))
    written.append(_line_plot(plt, curves, out / "speedup.png", title, "speedup", log_y=bool(predicted)))
    curves = [(ranks, [100 * r["efficiency"] for r in ok], "o-", "measured")] if ok else []
    if predicted:
        curves.append(([r["ranks"] for r in predicted], [100 * r["efficiency"] for r in predicted], "s:",
                       "predicted"))
    written.append(_line_plot(plt, curves, out / "efficiency.png", title, "parallel efficiency (%)", y_max=110))

    if not ok:
        return written
    fig, ax = plt.subplots(figsize=(5, 4))
    labels = [str(r) for r in ranks]
    bottom = [0.0] * len(ok)
    for key, name in (("compute_ms", "compute"), ("exposed_ms", "exposed communication"), ("data_ms", "data wait")):
        values = [r[key] for r in ok]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("ranks")
    ax.set_ylabel("ms per step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_split.png", dpi=100)
    written.append(str(out / "time_split.png"))
    plt.close(fig)
    return written


def _line_plot(plt, curves, path: Path, title: str, ylabel: str, log_y: bool = False, y_max=None) -> str:
    """One figure of (x, y, style, label) curves against ranks (log2 axes beyond a few ranks)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for x, y, style, label in curves:
        ax.plot(x, y, style, label=label)
    if max((max(x) for x, *_ in curves if x), default=1) > 8:
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log", base=2)
    if y_max is not None:
        ax.set_ylim(0, y_max)
    ax.set_xlabel("ranks")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str))
