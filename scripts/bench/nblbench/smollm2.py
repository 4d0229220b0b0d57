"""The end-to-end benchmark on SmolLM2-135M-Instruct (``scripts/bench/bench-smollm2.sh``).

Reads the script's work folder (``models.tsv``, ``eval.json``, ``bench.json``, ``inference.json``,
``analysis-{optimum,genai}.json``, the calibration logs and each rewrite's ``report.json``) and writes
``bench/results.json`` (raw), ``docs/results/smollm2.svg`` (perplexity and decode speed-up against the
number of replaced layers) and the table into ``docs/results/smollm2.md`` (block ``smollm2``).

    python3 -m nblbench.smollm2 WORK
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, RESULTS, load_json, tokens_per_s, write_json
from nblbench.splice import results_page, splice

RESULTS_JSON = BENCH / "results.json"
CHART = RESULTS / "smollm2.svg"


def collect(work: Path) -> dict:
    """The results of one run, from the work folder: every model's scores and timings against the
    original of its export, calibration's speed against plain inference, and the two exports' rankings."""
    manifest = [line.split("\t") for line in (work / "models.tsv").read_text().splitlines()]
    evaluation = load_json(work / "eval.json")
    timing = load_json(work / "bench.json")
    inference = load_json(work / "inference.json")
    analyses = {export: load_json(work / f"analysis-{export}.json") for export in ("optimum", "genai")}
    calibration_tps = tokens_per_s(work / "calibrate.log")
    inference_tps = inference["models"][0]["tokens_per_s"]

    scores = iter(evaluation["models"])  # the Optimum models, in manifest order
    bases: dict[str, dict] = {}
    rows = []
    for (label, export, method, k, path), time in zip(manifest, timing["models"]):
        assert time["path"] == path, (time["path"], path)
        base = bases.setdefault(export, time)
        score = next(scores) if export == "optimum" else None
        report = load_json(work / label / "report.json") if method != "original" else {}
        rows.append({
            "export": export,
            "method": method,
            "k": int(k),
            "layers": sorted(report.get("selected", [])),
            "ppl": score and score["ppl"],
            "kl": score and score.get("kl_vs_first", 0.0),
            "top1": score and score.get("top1_vs_first", 1.0),
            # Greedy continuations against the original's: mean common prefix, share identical.
            "gen_common": score and score.get("generation_vs_first", {}).get("mean_common_tokens"),
            "gen_exact": score and score.get("generation_vs_first", {}).get("exact_match_rate"),
            "prefill_ms": time["prefill_ms"],
            "decode_tok_s": time["decode_tok_s"],
            "prefill_ms_runs": time["prefill_ms_runs"],
            "decode_tok_s_runs": time["decode_tok_s_runs"],
            "prefill_speedup": base["prefill_ms"] / time["prefill_ms"],
            "decode_speedup": time["decode_tok_s"] / base["decode_tok_s"],
            "predicted_prefill_speedup": base["prefill_gmacs"] / time["prefill_gmacs"],
            "predicted_decode_speedup": base["decode_mmacs_per_token"] / time["decode_mmacs_per_token"],
            "kv_bytes_per_token": time["kv_bytes_per_token"],
            "peak_mem_mb": time["peak_mem_mb"],
        })

    # Layer ranking of the two exports of the same model, calibrated on the same data.
    order = {e: a["order"] for e, a in analyses.items()}
    bound = {e: {r["layer"]: r["bound"] for r in a["layers"]} for e, a in analyses.items()}
    ranking = {
        "same_order": order["optimum"] == order["genai"],
        "same_top_k": {k: sorted(order["optimum"][:k]) == sorted(order["genai"][:k]) for k in (4, 8, 12)},
        "max_relative_bound_difference": max(
            abs(bound["optimum"][l] - bound["genai"][l]) / abs(bound["optimum"][l]) for l in bound["optimum"]
        ),
        "optimum_order": order["optimum"],
        "genai_order": order["genai"],
    }
    return {
        "model": "SmolLM2-135M-Instruct (fp32; Optimum and ONNX Runtime GenAI exports)",
        "engine": timing["engine"],
        "prompt_len": timing["prompt_len"],
        "gen": timing["gen"],
        "runs": timing["runs"],
        "eval_tokens": evaluation["models"][0]["tokens"],
        # What eval generated from (its defaults): the first model's continuations are the reference.
        "gen_tokens": next((m["generation_vs_first"]["tokens"] for m in evaluation["models"][1:]), 0),
        "gen_prompts": next((m["generation_vs_first"]["prompts"] for m in evaluation["models"][1:]), 0),
        "calibration_tokens_per_s": calibration_tps,
        "calibration_genai_tokens_per_s": tokens_per_s(work / "calibrate-genai.log"),
        "inference_tokens_per_s": inference_tps,
        "calibration_share_of_inference": calibration_tps / inference_tps,
        "ranking": ranking,
        "rows": rows,
    }


def _fmt(v, spec: str) -> str:
    """``v`` formatted by ``spec``, or ``-`` where there is no value (the GenAI rows are not evaluated)."""
    return "-" if v is None else format(v, spec)


def table(results: dict) -> str:
    """The generated block of docs/results/smollm2.md: a caption, the table of every model, the
    run-to-run spread, calibration's share of inference and the two exports' rankings."""
    rows = results["rows"]
    ranking = results["ranking"]
    lines = [
        f"SmolLM2-135M-Instruct, {results['engine']}; perplexity, KL and top-1 on C4 documents 200-299 "
        f"({results['eval_tokens']} tokens, sequences of 512); prefill of {results['prompt_len']} tokens and "
        f"{results['gen']} decoded tokens, batch 1, median of {results['runs']} alternating runs. Speed-ups are "
        "measured, with the multiply-add prediction in brackets, against the original of the same export. "
        f"Generation: {results['gen_tokens']} tokens generated greedily from {results['gen_prompts']} held-out "
        "prompts, the mean length of the prefix shared with the original's continuation and the share identical.",
        "",
        "| export | method | k | layers | perplexity | KL | top-1 | generation: common, identical | prefill ms | decode tok/s | prefill speed-up (MACs) | decode speed-up (MACs) | KV bytes/token | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        generation = "-" if r["gen_common"] is None else f"{r['gen_common']:.2f}, {r['gen_exact']:.0%}"
        if r["method"] == "original" and r["export"] == "optimum":
            generation = f"{results['gen_tokens']}, 100%"
        lines.append(
            f"| {r['export']} | {r['method']} | {r['k']} | {','.join(map(str, r['layers'])) or '-'} | "
            f"{_fmt(r['ppl'], '.3f')} | {_fmt(r['kl'], '.4f')} | {_fmt(r['top1'], '.4f')} | {generation} | {r['prefill_ms']:.1f} | "
            f"{r['decode_tok_s']:.2f} | {r['prefill_speedup']:.3f}x ({r['predicted_prefill_speedup']:.3f}x) | "
            f"{r['decode_speedup']:.3f}x ({r['predicted_decode_speedup']:.3f}x) | {r['kv_bytes_per_token']} | "
            f"{r['peak_mem_mb']:.0f} |"
        )
    spread = lambda key: sorted(max(r[key]) / min(r[key]) - 1 for r in rows)  # noqa: E731
    prefill_spread, decode_spread = spread("prefill_ms_runs"), spread("decode_tok_s_runs")
    calibration_tps, inference_tps = results["calibration_tokens_per_s"], results["inference_tokens_per_s"]
    lines += [
        "",
        f"Run-to-run spread (slowest over fastest run of a model): prefill median {100 * prefill_spread[len(rows) // 2]:.0f}%, "
        f"largest {100 * prefill_spread[-1]:.0f}%; decode median {100 * decode_spread[len(rows) // 2]:.0f}%, "
        f"largest {100 * decode_spread[-1]:.0f}%.",
        "",
        f"Calibration ran at {calibration_tps:.0f} tokens/s, plain inference (eval) at {inference_tps:.0f} tokens/s "
        f"on the same engine and data: {100 * calibration_tps / inference_tps:.0f}%.",
        "",
        f"Layer ranking (CCA bound), Optimum export: {', '.join(map(str, ranking['optimum_order']))}; GenAI export: "
        f"{', '.join(map(str, ranking['genai_order']))}; "
        + ("identical" if ranking["same_order"] else "different")
        + f"; largest relative difference of a bound {ranking['max_relative_bound_difference']:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def chart(results: dict) -> str:
    """An SVG chart of the Optimum export: perplexity (solid, left scale) and decode speed-up (dashed,
    right scale) against the number of replaced layers, one colour per method."""
    width, height, m = 640, 360, 56
    colours = {"cca": "#e8891d", "cca-keep0": "#c0392b", "cosine": "#4878a8", "drop": "#8a8a8a"}
    ks = [0, 4, 8, 12]
    rows = [r for r in results["rows"] if r["export"] == "optimum"]
    ppls = [r["ppl"] for r in rows]
    lo, hi = min(ppls), max(ppls)
    speed = [r["decode_speedup"] for r in rows]
    slo, shi = min(speed + [1.0]), max(speed)
    x_of = lambda k: m + (width - 2 * m) * k / 12  # noqa: E731
    y_ppl = lambda v: height - m - (height - 2 * m) * (v - lo) / ((hi - lo) or 1)  # noqa: E731
    y_spd = lambda v: height - m - (height - 2 * m) * (v - slo) / ((shi - slo) or 1)  # noqa: E731
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{m}" y="20" font-size="13">SmolLM2-135M: perplexity (solid) and decode speed-up (dashed) vs replaced layers</text>']
    for method, colour in colours.items():
        pts = [r for r in rows if r["method"] in (method, "original")]
        pts.sort(key=lambda r: r["k"])
        svg.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="' +
                   " ".join(f"{x_of(r['k']):.1f},{y_ppl(r['ppl']):.1f}" for r in pts) + '"/>')
        svg.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 3" points="' +
                   " ".join(f"{x_of(r['k']):.1f},{y_spd(r['decode_speedup']):.1f}" for r in pts) + '"/>')
        svg.append(f'<text x="{width - m + 4}" y="{y_ppl(pts[-1]["ppl"]):.1f}" fill="{colour}">{method}</text>')
    for k in ks:
        svg.append(f'<text x="{x_of(k):.1f}" y="{height - m + 16}" text-anchor="middle">{k}</text>')
    svg.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">replaced attention layers (k)</text>')
    svg.append(f'<text x="8" y="{m - 8}">ppl {hi:.2f}</text><text x="8" y="{height - m}">ppl {lo:.2f}</text>')
    svg.append(f'<text x="{width - m - 40}" y="{m - 8}">{shi:.2f}x</text><text x="{width - m - 40}" y="{height - m}">{slo:.2f}x</text>')
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: collect WORK, write the JSON, the chart and the table; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="the work folder of bench-smollm2.sh")
    args = parser.parse_args(argv)
    results = collect(args.work)
    write_json(RESULTS_JSON, results)
    CHART.parent.mkdir(parents=True, exist_ok=True)
    CHART.write_text(chart(results))
    text = table(results)
    splice(results_page("smollm2"), "smollm2", text)
    print(text)
    print(f"wrote {RESULTS_JSON}, {CHART} and {results_page('smollm2')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
