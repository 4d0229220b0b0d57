"""Budget mode on SmolLM2's GenAI int4 export (``scripts/bench/bench-int4-budget.sh``).

    python3 -m nblbench.int4_budget WORK

Reads the work folder (``report.json``, ``check.json``, ``genai*.json``, ``bench.json`` and the GNU time
files ``pass.time``, ``calibrate.time``, ``rewrite.time``), writes ``bench/int4-budget.json`` and the table
of ``docs/results/int4.md`` (block ``int4-budget``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, load_json, write_json
from nblbench.splice import results_page, splice

BUDGET_JSON = BENCH / "int4-budget.json"


def _seconds(path: Path) -> float:
    return float(path.read_text().split()[0])


def collect(work: Path) -> dict:
    report = load_json(work / "report.json")
    budget = report["budget"]
    check = load_json(work / "check.json")
    bench = load_json(work / "bench.json")
    rewritten = bench["models"][1]
    units = [u["kind"] + " " + str(u["layer"]) if u["kind"] not in ("run", "fold")
             else f"{u['kind']} {u['layer']}-{u['layer'] + u.get('span', 1) - 1}" for u in budget["units"]]
    return {
        "budget": budget["limit"],
        "units": units,
        "weight_format": report["rewrite"]["weight_format"],
        "folds": report["rewrite"].get("folds", []),
        "probe_kl": budget["probe_harm"],
        "heldout_kl": budget["heldout_kl"],
        "heldout_ppl_increase": budget["heldout_ppl_increase"],
        "predicted_decode_speedup": budget["predicted_decode_speedup"],
        "predicted_prefill_speedup": budget["predicted_prefill_speedup"],
        "search_seconds": budget["seconds"],
        "search_passes": budget["passes"],
        "probe_tokens": budget["probe_tokens"],
        "calibration_pass_seconds": _seconds(work / "pass.time"),
        "calibrate_all_units_seconds": _seconds(work / "calibrate.time"),
        "rewrite_seconds": _seconds(work / "rewrite.time"),
        "check_passed": not check["problems"],
        "check_kl": (check.get("reference") or {}).get("mean_kl"),
        "genai_tokens": load_json(work / "genai.json"),
        "genai_tokens_original": load_json(work / "genai-original.json"),
        "measured_decode_speedup": rewritten["decode_speedup"],
        "measured_prefill_speedup": rewritten["prefill_speedup"],
        "bench_runs": bench["runs"],
    }


def table(r: dict) -> str:
    same = sum(a == b for a, b in zip(r["genai_tokens"], r["genai_tokens_original"]))
    rows = [
        ("budget", f"probe KL ≤ {r['budget']['max']}, `--units all`"),
        ("units replaced", f"{len(r['units'])}: {', '.join(r['units'])}"),
        ("maps", "int4 `MatMulNBits` (GPTQ), the model's own group size"),
        ("folds", f"{len(r['folds'])}, each into its MLP's `MatMulNBits` down-projection, requantised (round to nearest)"
         if r["folds"] else "none chosen"),
        ("KL: probe, held-out", f"{r['probe_kl']:.4f}, {r['heldout_kl']:.4f}"),
        ("held-out perplexity", f"{100 * r['heldout_ppl_increase']:+.2f}%"),
        ("decode speed-up: measured (predicted)", f"{r['measured_decode_speedup']:.3f}× ({r['predicted_decode_speedup']:.3f}×)"),
        ("prefill speed-up: measured (predicted)", f"{r['measured_prefill_speedup']:.3f}× ({r['predicted_prefill_speedup']:.3f}×)"),
        ("`check`", "passed" if r["check_passed"] else "FAILED"),
        ("onnxruntime-genai, 20 greedy tokens", f"{same} of 20 as the original's, position by position"),
        ("the rewrite (scoring every unit alone, the search, the held-out check, writing)",
         f"{r['rewrite_seconds']:.0f} s, {r['search_passes']} probe passes of {r['probe_tokens']} tokens"),
        ("one calibration pass (attention sites)", f"{r['calibration_pass_seconds']:.0f} s"),
        ("calibrating every unit", f"{r['calibrate_all_units_seconds']:.0f} s"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    result = collect(args.work)
    write_json(BUDGET_JSON, result)
    text = table(result)
    splice(results_page("int4"), "int4-budget", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
