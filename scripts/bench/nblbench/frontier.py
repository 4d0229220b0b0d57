"""The frontier of speed against quality on SmolLM2-135M (``scripts/bench/bench-frontier.sh``).

    python3 -m nblbench.frontier WORK SWEEP_DIR

Reads ``SWEEP_DIR/sweep.json`` (``nbl-onnx sweep``) and the calibration and sweep times in ``WORK``
(``NAME.time``: GNU time's wall seconds and peak KiB), writes ``bench/frontier.json`` (the chosen points
and the goals, raw) and the tables of ``docs/results/frontier.md`` (blocks ``frontier-budgets``,
``frontier-goals``, ``frontier-cost``, ``frontier-points``), and copies the chart to
``docs/results/frontier.svg``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from nblbench.common import BENCH, RESULTS, load_json, write_json
from nblbench.splice import results_page, splice

FRONTIER_JSON = BENCH / "frontier.json"
#: The curves in the tables' order, with what each row is called.
METHODS = {
    "budget": "budget mode, --units all",
    "budget-attention": "budget mode, --units attention",
    "budget-mlp": "budget mode, MLPs alone †",
    "budget-layer": "budget mode, whole layers alone †",
    "budget-run": "budget mode, runs alone †",
    "budget-fold": "budget mode, folds alone †",
    "nbl": "paper's NBL (CCA order)",
    "cosine": "cosine order, maps",
    "drop": "attention dropped (LLM-Drop)",
}


def _measured(point: dict, budget: float) -> dict | None:
    return next((m for m in point.get("measured", []) if m["max_kl"] == budget), None)


def chosen(sweep: dict) -> list[dict]:
    """One row per budget and curve: the curve's fastest point within the budget, as timed in that
    budget's bench run."""
    rows = []
    for b, budget in enumerate(sweep["max_kl"]):
        for curve in sweep["curves"]:
            index = curve["chosen"][b]
            row = {"budget": budget, "method": curve["method"]}
            if index is not None:
                point = curve["points"][index]
                timed = _measured(point, budget) or {}
                generation = point.get("generation") or {}
                row.update(
                    units=[_unit(u) for u in point["units"]],
                    kl=point["heldout"]["kl"],
                    ppl=point["heldout"]["ppl"],
                    top1=point["heldout"]["top1"],
                    predicted_decode=point["predicted_decode_speedup"],
                    predicted_prefill=point["predicted_prefill_speedup"],
                    decode=timed.get("decode_speedup"),
                    prefill=timed.get("prefill_speedup"),
                    common_tokens=generation.get("mean_common_tokens"),
                    gen_tokens=generation.get("tokens"),
                )
            rows.append(row)
    return rows


def _unit(u: dict) -> str:
    span = u.get("span", 1)
    if u["kind"] in ("run", "fold"):
        return f"{u['kind']} {u['layer']}-{u['layer'] + span - 1}"
    return f"{u['kind']} {u['layer']}"


def _gain_ratio(a: float | None, b: float | None) -> float | None:
    """``(a − 1) / (b − 1)``: how many times b's gain a's is; None where b gains nothing."""
    if a is None or b is None or b - 1 <= 1e-9:
        return None
    return (a - 1) / (b - 1)


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals: the budget mode's gain against the paper's at KL ≤ 0.1 (2×) and ≤ 0.2 (3×),
    and all units' against attention's at KL ≤ 0.3 (1.3×), decode and prefill, measured."""
    at = {(r["budget"], r["method"]): r for r in rows}
    out = []
    for budget, versus, target in ((0.1, "nbl", 2.0), (0.2, "nbl", 3.0), (0.3, "budget-attention", 1.3)):
        a, b = at.get((budget, "budget"), {}), at.get((budget, versus), {})
        for what in ("decode", "prefill"):
            ratio = _gain_ratio(a.get(what), b.get(what))
            out.append({
                "budget": budget, "versus": versus, "what": what, "target": target,
                "budget_mode": a.get(what), "other": b.get(what), "ratio": ratio,
                "met": ratio is not None and ratio >= target,
            })
    return out


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}×"


def budgets_table(rows: list[dict]) -> str:
    lines = [
        "† one kind of unit alone, drawn for comparison: not timed, so only its predicted speed-ups show.",
        "",
        "| held-out KL ≤ | method | units | held-out KL | perplexity | measured decode | measured prefill "
        "| predicted decode | predicted prefill | greedy tokens in common | replaced |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = METHODS.get(r["method"], r["method"])
        if "units" not in r:
            lines.append(f"| {r['budget']} | {name} | 0 | – | – | – | – | – | – | – | nothing fits |")
            continue
        common = "–" if r["common_tokens"] is None else f"{r['common_tokens']:.1f} of {r['gen_tokens']}"
        units = ", ".join(r["units"])
        lines.append(
            f"| {r['budget']} | {name} | {len(r['units'])} | {r['kl']:.4f} | {r['ppl']:.3f} | {_x(r['decode'])} "
            f"| {_x(r['prefill'])} | {_x(r['predicted_decode'])} | {_x(r['predicted_prefill'])} | {common} "
            f"| {units} |"
        )
    return "\n".join(lines)


def goals_table(goal_rows: list[dict]) -> str:
    lines = [
        "| held-out KL ≤ | speed | budget mode | against | its speed-up | gain ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in goal_rows:
        ratio = "–" if g["ratio"] is None else f"{g['ratio']:.2f}"
        lines.append(
            f"| {g['budget']} | {g['what']} | {_x(g['budget_mode'])} | {METHODS[g['versus']]} | {_x(g['other'])} "
            f"| {ratio} | ≥ {g['target']} | {'yes' if g['met'] else 'no'} |"
        )
    return "\n".join(lines)


def _time(path: Path) -> tuple[float, float]:
    seconds, kib = path.read_text().split()
    return float(seconds), float(kib) / 1024


def cost_table(work: Path, sweep: dict) -> tuple[str, dict]:
    cost = {}
    for name in ("attention", "all", "sweep"):
        path = work / f"{name}.time"
        if path.exists():
            seconds, mib = _time(path)
            cost[name] = {"seconds": seconds, "peak_mib": mib}
    lines = ["| step | wall time | peak memory |", "|---|---|---|"]
    labels = {
        "attention": "calibrate --units attention",
        "all": "calibrate --units all",
        "sweep": "sweep (the budget searches, every curve on held-out text, 3 bench runs)",
    }
    for name, c in cost.items():
        lines.append(f"| {labels[name]} | {c['seconds']:.0f} s | {c['peak_mib']:.0f} MiB |")
    return "\n".join(lines), cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    sweep = load_json(args.sweep_dir / "sweep.json")
    rows = chosen(sweep)
    goal_rows = goals(rows)
    cost_text, cost = cost_table(args.work, sweep)
    write_json(FRONTIER_JSON, {
        "model": sweep["model"], "budgets": sweep["max_kl"], "heldout_tokens": sweep["heldout_tokens"],
        "original_ppl": sweep["original_ppl"], "bench": sweep.get("bench"), "chosen": rows, "goals": goal_rows,
        "cost": cost,
    })
    page = results_page("frontier")
    splice(page, "frontier-budgets", budgets_table(rows))
    splice(page, "frontier-goals", goals_table(goal_rows))
    splice(page, "frontier-cost", cost_text)
    splice(page, "frontier-points", (args.sweep_dir / "sweep.md").read_text())
    shutil.copyfile(args.sweep_dir / "sweep.svg", RESULTS / "frontier.svg")
    print(f"wrote {FRONTIER_JSON} and {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
