"""f32 per-batch moments against f64 on SmolLM2 (``scripts/bench/bench-moment-precision.sh``).

    python3 -m nblbench.precision WORK

Reads the four calibrations' logs and ``analyze --json`` files (``{host,graph}-{f64,f32}``), the plain
inference rate (``inference.json``) and the held-out evaluation of the k = 8 rewrites (``eval.json``);
writes ``bench/moment-precision.json`` and the table of ``docs/results/moment-precision.md`` (block
``moment-precision``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, load_json, thousands, times, tokens_per_s, write_json
from nblbench.splice import results_page, splice

PRECISION_JSON = BENCH / "moment-precision.json"


def _bounds(analysis: dict) -> list[float]:
    return [row["bound"] for row in sorted(analysis["layers"], key=lambda r: r["layer"])]


def collect(work: Path) -> dict:
    inference = load_json(work / "inference.json")["models"][0]["tokens_per_s"]
    runs = {}
    for moments in ("host", "graph"):
        for precision in ("f64", "f32"):
            name = f"{moments}-{precision}"
            analysis = load_json(work / f"{name}-analysis.json")
            rate = tokens_per_s(work / f"{name}.log")
            runs[name] = {"tokens_per_s": rate, "share_of_inference": rate / inference,
                          "bounds": _bounds(analysis), "order": analysis["order"]}
    comparisons = {}
    for moments in ("host", "graph"):
        exact, narrow = runs[f"{moments}-f64"], runs[f"{moments}-f32"]
        relative = [abs(a - b) / abs(b) for a, b in zip(narrow["bounds"], exact["bounds"])]
        comparisons[moments] = {
            "max_bound_relative_difference": max(relative),
            "layer_of_max": max(range(len(relative)), key=relative.__getitem__),
            "same_ranking": narrow["order"] == exact["order"],
            "speedup_f32_over_f64": narrow["tokens_per_s"] / exact["tokens_per_s"],
        }
    scores = load_json(work / "eval.json")["models"]
    original, f64, f32 = (m["ppl"] for m in scores)
    return {
        "model": "SmolLM2-135M-Instruct (Optimum fp32)",
        "inference_tokens_per_s": inference,
        "runs": runs,
        "comparisons": comparisons,
        "k8": {"original_ppl": original, "f64_ppl": f64, "f32_ppl": f32,
               "relative_difference": abs(f32 - f64) / f64},
    }


def table(r: dict) -> str:
    rows = ["| moments | products | calibration | share of plain inference | bounds vs f64: max relative difference | same ranking |",
            "|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        moments, precision = name.split("-")
        comparison = r["comparisons"][moments]
        diff, same = ("–", "–") if precision == "f64" else (
            f"{comparison['max_bound_relative_difference']:.1e} (layer {comparison['layer_of_max']})",
            "yes" if comparison["same_ranking"] else "no")
        rows.append(f"| {moments} | {precision} | {thousands(run['tokens_per_s'])} tokens/s | "
                    f"{times(run['share_of_inference'])} | {diff} | {same} |")
    k8 = r["k8"]
    rows.append("")
    rows.append(f"Plain inference on the same text: {thousands(r['inference_tokens_per_s'])} tokens/s. "
                f"k = 8 rewrites, held-out perplexity: {k8['f64_ppl']:.4f} from f64 statistics, "
                f"{k8['f32_ppl']:.4f} from f32 ({100 * k8['relative_difference']:.4f}% apart; the original "
                f"{k8['original_ppl']:.4f}).")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    result = collect(args.work)
    write_json(PRECISION_JSON, result)
    text = table(result)
    splice(results_page("moment-precision"), "moment-precision", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
