"""The 8B-shape device check's results (``scripts/gpu-check.sh --scale``).

    python3 -m nblbench.gpu_scale model W PRECISION LAYERS DECODE_CONTEXT > W/result.json
    python3 -m nblbench.gpu_scale combine OUT GPU EP RESULT.json...

``model`` reads one precision's work folder: ``calibrate-{f32,f64}.log`` and ``analyze-{f32,f64}.json``
(in-graph statistics, each batch's products in f32 and in f64), ``rewrite-K.json`` and
``bench-P.json`` (the original and every rewrite side by side after prompts of P tokens). It prints
calibration's speed against the model's own prefill (both with the session load left out, as bench
leaves it out), how far the f32 bounds are from f64's, and each rewrite's speed-ups beside the
paper's. ``combine`` writes them to OUT (``bench/gpu-scale.json`` by default) and, when OUT is in
``bench/``, a table into ``docs/results/gpu.md`` (block ``gpu-scale``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from nblbench.common import load_json, md_table, thousands, times, write_json
from nblbench.splice import publish

#: NBL on Mistral-7B in the paper (arXiv 2505.21077): prefill and throughput speed-ups at k layers.
PAPER = {8: {"prefill": 1.17, "throughput": 1.20}, 12: {"prefill": 1.28, "throughput": 1.27}}


def running_tokens_per_s(log: Path) -> float:
    """Calibration's rate once its session is built (``N tokens/s after the S s session load``)."""
    match = re.search(r"([\d.]+) tokens/s after the ([\d.]+) s session load", log.read_text())
    if match is None:
        raise SystemExit(f"error: {log} holds no 'tokens/s after the ... session load': did calibrate finish?")
    return float(match.group(1))


def bounds(analysis: dict) -> list[float]:
    return [row["bound"] for row in sorted(analysis["layers"], key=lambda r: r["layer"])]


def model_result(w: Path, precision: str, layers: int, decode_context: int) -> dict:
    benches = {int(p.stem.split("-")[1]): load_json(p) for p in sorted(w.glob("bench-*.json"))}
    if decode_context not in benches:
        raise SystemExit(f"error: {w} has no bench-{decode_context}.json for decoding at that context")
    shortest = min(benches)
    original = benches[shortest]["models"][0]
    prefill_tok_s = shortest / (original["prefill_ms"] / 1000)
    calibration = {"prefill_tokens_per_s": prefill_tok_s, "prefill_prompt_len": shortest}
    for precision_of_products in ("f32", "f64"):
        rate = running_tokens_per_s(w / f"calibrate-{precision_of_products}.log")
        calibration[precision_of_products] = {"tokens_per_s": rate, "share_of_prefill": rate / prefill_tok_s}
    f32, f64 = (load_json(w / f"analyze-{p}.json") for p in ("f32", "f64"))
    calibration["bound_max_relative_difference"] = max(
        abs(a - b) / max(abs(b), 1e-300) for a, b in zip(bounds(f32), bounds(f64)))
    calibration["same_ranking"] = f32["order"] == f64["order"]
    rewrites = []
    for report in sorted(w.glob("rewrite-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        k = int(report.stem.split("-")[1])
        row = {"k": k, "layers": load_json(report)["rewrite"]["layers"], "paper_mistral_7b": PAPER.get(k)}
        for prompt_len, bench in benches.items():
            timed = next(m for m in bench["models"] if m["path"].endswith(f"nbl-{k}/model.onnx"))
            row[f"prefill_speedup_{prompt_len}"] = timed["prefill_speedup"]
            row[f"predicted_prefill_speedup_{prompt_len}"] = timed["predicted_prefill_speedup"]
        timed = next(m for m in benches[decode_context]["models"] if m["path"].endswith(f"nbl-{k}/model.onnx"))
        row["decode_speedup"] = timed["decode_speedup"]
        row["predicted_decode_speedup_bytes"] = timed["predicted_decode_speedup_bytes"]
        rewrites.append(row)
    return {"precision": precision, "layers": layers, "decode_context": decode_context,
            "prefill_prompt_lens": sorted(benches), "calibration": calibration, "rewrites": rewrites,
            "bench": benches}


def table(result: dict) -> str:
    """The generated block: calibration per precision, then each rewrite's speed-ups."""
    lines = [f"{result['gpu']}; execution provider {result['ep']}; Llama-3-8B's shapes, random weights:", ""]
    header = ["model", "calibration, f32 products", "f64 products", "prefill alone",
              "bounds f32 vs f64", "same ranking"]
    rows = []
    for m in result["models"]:
        c = m["calibration"]
        rows.append([
            f"{m['precision']}, {m['layers']} layers",
            f"{thousands(c['f32']['tokens_per_s'])} tokens/s ({c['f32']['share_of_prefill']:.2f}×)",
            f"{thousands(c['f64']['tokens_per_s'])} tokens/s ({c['f64']['share_of_prefill']:.2f}×)",
            f"{thousands(c['prefill_tokens_per_s'])} tokens/s at {c['prefill_prompt_len']}",
            f"{c['bound_max_relative_difference']:.1e}",
            "yes" if c["same_ranking"] else "no",
        ])
    lines += md_table(header, rows)
    lines.append("")
    header = ["model", "k"] + [f"prefill at {n}" for n in result["models"][0]["prefill_prompt_lens"]] + [
        f"decode at {result['models'][0]['decode_context']} (bytes predicted)", "paper, Mistral-7B: prefill, throughput"]
    rows = []
    for m in result["models"]:
        for r in m["rewrites"]:
            paper = r["paper_mistral_7b"]
            rows.append([f"{m['precision']}", str(r["k"])]
                        + [f"{times(r[f'prefill_speedup_{n}'])} ({times(r[f'predicted_prefill_speedup_{n}'])})"
                           for n in m["prefill_prompt_lens"]]
                        + [f"{times(r['decode_speedup'])} ({times(r['predicted_decode_speedup_bytes'])})",
                           f"{times(paper['prefill'])}, {times(paper['throughput'])}" if paper else "–"])
    lines += md_table(header, rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", help="print one precision's result as JSON")
    p.add_argument("w", type=Path)
    p.add_argument("precision")
    p.add_argument("layers", type=int)
    p.add_argument("decode_context", type=int)
    p = sub.add_parser("combine", help="write the check's JSON and its table")
    p.add_argument("out", type=Path)
    p.add_argument("gpu")
    p.add_argument("ep")
    p.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "model":
        print(json.dumps(model_result(args.w, args.precision, args.layers, args.decode_context), indent=2))
        return 0
    result = {"gpu": args.gpu, "ep": args.ep, "models": [load_json(f) for f in args.results]}
    write_json(args.out, result)
    text = table(result)
    print(text)
    publish(args.out, "gpu", "gpu-scale", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
