"""Turns the raw outputs of scripts/bench-smollm2.sh into bench/results.json, bench/results.md and
bench/results.svg (perplexity and speed-ups against the number of replaced layers)."""

import json
import re
import sys
from pathlib import Path

work = Path(sys.argv[1])
labels = sys.argv[2:]
evaluation = json.loads((work / "eval.json").read_text())
timing = json.loads((work / "bench.json").read_text())
calibrate_log = (work / "calibrate.log").read_text()
inference = json.loads((work / "inference.json").read_text())

calibration_tps = float(re.search(r"\(([\d.]+) tokens/s\)", calibrate_log).group(1))
inference_tps = inference["models"][0]["tokens_per_s"]

rows = []
base = timing["models"][0]
for label, score, time in zip(labels, evaluation["models"], timing["models"]):
    method, k = ("original", 0) if label == "original" else (label.rsplit("-k", 1)[0], int(label.rsplit("-k", 1)[1]))
    report = {}
    if label != "original":
        report = json.loads((work / label / "report.json").read_text())
    rows.append({
        "method": method,
        "k": k,
        "layers": report.get("selected", []),
        "ppl": score["ppl"],
        "kl": score.get("kl_vs_first", 0.0),
        "top1": score.get("top1_vs_first", 1.0),
        "prefill_ms": time["prefill_ms"],
        "decode_tok_s": time["decode_tok_s"],
        "prefill_speedup": base["prefill_ms"] / time["prefill_ms"],
        "decode_speedup": time["decode_tok_s"] / base["decode_tok_s"],
        "kv_bytes_per_token": time["kv_bytes_per_token"],
        "peak_mem_mb": time["peak_mem_mb"],
    })

results = {
    "model": "SmolLM2-135M-Instruct (Optimum export, fp32)",
    "engine": timing["engine"],
    "prompt_len": timing["prompt_len"],
    "gen": timing["gen"],
    "runs": timing["runs"],
    "eval_tokens": evaluation["models"][0]["tokens"],
    "calibration_tokens_per_s": calibration_tps,
    "inference_tokens_per_s": inference_tps,
    "calibration_share_of_inference": calibration_tps / inference_tps,
    "rows": rows,
}
Path("bench/results.json").write_text(json.dumps(results, indent=2) + "\n")

lines = [
    f"SmolLM2-135M-Instruct, {results['engine']}; perplexity, KL and top-1 on C4 documents 200-299 "
    f"({results['eval_tokens']} tokens, blocks of 512); prefill of {results['prompt_len']} tokens and "
    f"{results['gen']} decoded tokens, batch 1, median of {results['runs']} alternating runs.",
    "",
    "| method | k | layers | perplexity | KL | top-1 | prefill ms | decode tok/s | prefill speed-up | decode speed-up | KV bytes/token |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    lines.append(
        f"| {r['method']} | {r['k']} | {','.join(map(str, sorted(r['layers']))) or '-'} | {r['ppl']:.3f} | "
        f"{r['kl']:.4f} | {r['top1']:.4f} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.2f} | "
        f"{r['prefill_speedup']:.3f}x | {r['decode_speedup']:.3f}x | {r['kv_bytes_per_token']} |"
    )
lines.append("")
lines.append(
    f"Calibration ran at {calibration_tps:.0f} tokens/s, plain inference (eval) at {inference_tps:.0f} tokens/s "
    f"on the same engine and data: {100 * calibration_tps / inference_tps:.0f}%."
)
Path("bench/results.md").write_text("\n".join(lines) + "\n")

# Perplexity (left axis) and decode speed-up (right axis) against k, one line per method.
width, height, m = 640, 360, 56
colours = {"cca": "#e8891d", "cosine": "#4878a8", "drop": "#8a8a8a"}
ks = [0, 4, 8, 12]
ppls = [r["ppl"] for r in rows]
lo, hi = min(ppls), max(ppls)
speed = [r["decode_speedup"] for r in rows]
slo, shi = min(speed + [1.0]), max(speed)
x_of = lambda k: m + (width - 2 * m) * k / 12
y_ppl = lambda v: height - m - (height - 2 * m) * (v - lo) / ((hi - lo) or 1)
y_spd = lambda v: height - m - (height - 2 * m) * (v - slo) / ((shi - slo) or 1)
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
Path("bench/results.svg").write_text("\n".join(svg) + "\n")
print(Path("bench/results.md").read_text())
