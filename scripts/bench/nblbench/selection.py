"""How layers are chosen and fitted, compared on SmolLM2-135M (``scripts/bench/bench-selection.sh``).

    python3 -m nblbench.selection best EVAL_FIRST.json          # the best ranking at k = 8, by perplexity
    python3 -m nblbench.selection report WORK BEST STAGE_SIZE STAGE_SAMPLES

``report`` reads the work folder (``eval-first.json``, ``eval-sequential.json``, ``pass.time`` and each
rewrite's ``report.json`` and ``time``) and writes ``bench/selection.json`` (raw) and the table into
``docs/results/selection.md`` (block ``selection``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, load_json, write_json
from nblbench.splice import results_page, splice

SELECTION_JSON = BENCH / "selection.json"
#: The rankings that choose layers, compared at k = 8 to pick the one sequential fitting uses.
RANKINGS = ("cca", "cosine", "residual", "weighted-cca", "measured")
#: Every method, in the table's order.
METHODS = ("cca", "cosine", "residual", "weighted-cca", "measured", "sequential", "drop")
KS = (4, 8, 12)


def _model_label(model: dict) -> str:
    """The rewrite a scored model is: its directory's name (``cca-k8`` for ``.../cca-k8/model.onnx``)."""
    return model["path"].split("/")[-2]


def best(eval_first: dict) -> str:
    """The ranking with the lowest perplexity at k = 8 in an ``eval --json`` of the one-shot rewrites."""
    scores = {_model_label(m): m["ppl"] for m in eval_first["models"][1:]}
    return min(RANKINGS, key=lambda n: scores[f"{n}-k8"])


def collect(work: Path, best_ranking: str, stage_size: int, stage_samples: int) -> dict:
    """Every method's rows (layers, perplexity, KL, top-1, rewrite time, and what measured selection and
    sequential fitting cost), with each row's perplexity increase relative to the better of cca/cosine."""
    pass_s = float((work / "pass.time").read_text())
    scores = {}
    original = None
    for name in ("eval-first.json", "eval-sequential.json"):
        models = load_json(work / name)["models"]
        original = models[0]
        for m in models[1:]:
            scores[_model_label(m)] = m
    rows = [{"method": "original", "k": 0, "layers": [], "ppl": original["ppl"], "kl": 0.0, "top1": 1.0}]
    for method in METHODS:
        for k in KS:
            label = f"{method}-k{k}"
            report = load_json(work / label / "report.json")
            score = scores[label]
            row = {"method": method if method != "sequential" else f"sequential ({best_ranking})", "k": k,
                   "layers": report["selected"], "ppl": score["ppl"], "kl": score["kl_vs_first"],
                   "top1": score["top1_vs_first"], "rewrite_s": float((work / label / "time").read_text())}
            if report.get("measured"):
                row["passes"] = report["measured"]["passes"]
                row["probe_tokens"] = report["measured"]["probe_tokens"]
                row["selection_s"] = report["measured"]["seconds"]
            if report.get("stages"):
                row["stages"] = len(report["stages"])
                row["stage_s"] = sum(s["seconds"] for s in report["stages"])
            rows.append(row)
    base = original["ppl"]
    for k in (8, 12):
        reference = min(r["ppl"] for r in rows if r["k"] == k and r["method"] in ("cca", "cosine"))
        for r in rows:
            if r["k"] == k:
                r["increase_vs_best_published"] = (r["ppl"] - base) / (reference - base)
    return {"model": "SmolLM2-135M-Instruct (Optimum)", "calibration": "C4 documents 0-199, 512-token blocks",
            "evaluation": "C4 documents 200-299", "stage_size": stage_size, "stage_samples": stage_samples,
            "calibration_pass_s": pass_s, "rows": rows}


def table(result: dict) -> str:
    """The generated block of docs/results/selection.md: one row per method and k, and a note on the
    cost columns."""
    pass_s = result["calibration_pass_s"]
    lines = [
        "| method | k | layers | perplexity | KL | top-1 | increase vs best of cca/cosine | extra cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cost = ""
        if "passes" in r:
            cost = (f"{r['passes']} passes of {r['probe_tokens']} tokens, {r['selection_s']:.0f} s "
                    f"({r['selection_s'] / pass_s:.1f} calibration passes)")
        if "stages" in r:
            cost = f"{r['stages']} stages, {r['stage_s']:.0f} s ({r['stage_s'] / pass_s:.1f} calibration passes)"
        ratio = f"{r['increase_vs_best_published']:.2f}" if "increase_vs_best_published" in r else ""
        layers = ",".join(map(str, sorted(r["layers"]))) or "-"
        lines.append(f"| {r['method']} | {r['k']} | {layers} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | "
                     f"{ratio} | {cost} |")
    note = (f"\nA calibration pass of {result['stage_samples']} sequences of 512 tokens took {pass_s:.0f} s; the ratio "
            "column is the perplexity increase over the original relative to the better of cca and cosine at the "
            "same k.\n")
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    """Command line: ``best`` prints a ranking's name; ``report`` writes the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("best", help="print the ranking with the lowest perplexity at k = 8")
    p.add_argument("eval_first", type=Path)
    p = sub.add_parser("report", help="write bench/selection.json and docs/results/selection.md")
    p.add_argument("work", type=Path)
    p.add_argument("best")
    p.add_argument("stage_size", type=int)
    p.add_argument("stage_samples", type=int)
    args = parser.parse_args(argv)
    if args.command == "best":
        print(best(load_json(args.eval_first)))
        return 0
    result = collect(args.work, args.best, args.stage_size, args.stage_samples)
    write_json(SELECTION_JSON, result)
    text = table(result)
    splice(results_page("selection"), "selection", text)
    print(text)
    print(f"wrote {SELECTION_JSON} and {results_page('selection')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
