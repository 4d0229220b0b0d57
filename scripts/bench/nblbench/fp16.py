"""NBL on the fp16 exports of SmolLM2-135M-Instruct, on the CPU (``scripts/bench/bench-fp16.sh``).

Reads the work folder (per export: ``inspect.json``, ``rewrite.json``, ``check.json``,
``check-original.json``, ``eval.json``, ``bench.json``) and writes ``bench/fp16.json`` (raw) and the table
into ``docs/results/fp16.md`` (block ``fp16``).

    python3 -m nblbench.fp16 WORK EXPORT...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, load_json, md_table, write_json
from nblbench.splice import results_page, splice

FP16_JSON = BENCH / "fp16.json"
#: How the docs name each export (the directory names under models/).
LABELS = {
    "smollm2-genai-fp16": "GenAI `-p fp16 -e cpu`",
    "smollm2-optimum-fp16": "Optimum `--dtype fp16`",
}


def collect(work: Path, names: list[str]) -> dict:
    """Per export: its layer count, the layers chosen, the maps' format, the weights before and after,
    the rewrite's check, the original's own check problems, eval and bench."""
    result = {}
    for name in names:
        w = work / name
        rewrite = load_json(w / "rewrite.json")
        result[name] = {
            "layers": len(load_json(w / "inspect.json")["layers"]),
            "selected": rewrite["selected"],
            "weight_format": rewrite["rewrite"]["weight_format"],
            "weights_before": rewrite["rewrite"]["weights_before"],
            "weights_after": rewrite["rewrite"]["weights_after"],
            "check": load_json(w / "check.json"),
            "check_original_problems": load_json(w / "check-original.json")["problems"],
            "eval": load_json(w / "eval.json"),
            "bench": load_json(w / "bench.json"),
        }
    return result


def weight_format(value) -> str:
    """The maps' storage as a short name: ``{"Float": "f16"}`` is ``f16``."""
    if isinstance(value, dict):
        return str(value.get("Float", value))
    return str(value)


def table(result: dict) -> str:
    """The generated block of docs/results/fp16.md: one row per export."""
    ks = {len(r["selected"]) for r in result.values()}
    k = ks.pop() if len(ks) == 1 else "k"
    header = ["export", "W", "check", f"perplexity (original → k = {k})", "KL", "top-1",
              "greedy tokens in common", "prefill x", "decode x"]
    rows = []
    for name, r in result.items():
        original, rewritten = r["eval"]["models"][:2]
        generation = rewritten.get("generation_vs_first") or {}
        bench = r["bench"]["models"][1]
        rows.append([
            LABELS.get(name, f"`{name}`"),
            weight_format(r["weight_format"]),
            "passes" if not r["check"]["problems"] else "FAILS",
            f"{original['ppl']:.2f} → {rewritten['ppl']:.2f}",
            f"{rewritten['kl_vs_first']:.3f}",
            f"{rewritten['top1_vs_first']:.3f}",
            f"{generation.get('mean_common_tokens', float('nan')):.2f} of {generation.get('tokens', '-')}",
            f"{bench['prefill_speedup']:.2f}",
            f"{bench['decode_speedup']:.2f}",
        ])
    return "\n".join(md_table(header, rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: collect WORK's exports, write the JSON and the table; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="the work folder of bench-fp16.sh")
    parser.add_argument("exports", nargs="+", help="the exports' directory names under models/")
    args = parser.parse_args(argv)
    result = collect(args.work, args.exports)
    write_json(FP16_JSON, result)
    text = table(result)
    splice(results_page("fp16"), "fp16", text)
    print(text)
    print(f"wrote {FP16_JSON} and {results_page('fp16')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
