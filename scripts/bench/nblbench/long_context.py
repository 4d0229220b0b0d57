"""Speed-ups against context length on SmolLM2 (``scripts/bench/bench-long-context.sh``).

    python3 -m nblbench.long_context WORK

Reads ``WORK/bench-<prompt length>-k<k>.json`` (one ``nbl-onnx bench --json`` per length and k: the
original, then NBL at that k) or, from earlier runs, ``WORK/bench-<prompt length>.json`` (the original,
then k = 4, 8, 12 in one run), writes ``bench/long-context.json``, the table of
``docs/results/long-context.md`` (block ``long-context``) and ``docs/results/long-context.svg``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from nblbench.common import BENCH, RESULTS, load_json, write_json
from nblbench.splice import results_page, splice

LONG_JSON = BENCH / "long-context.json"
KS = (4, 8, 12)


def collect(work: Path) -> dict:
    points = []

    def order(path: Path) -> tuple[int, int]:
        numbers = re.match(r"bench-(\d+)(?:-k(\d+))?$", path.stem)
        return int(numbers.group(1)), int(numbers.group(2) or 0)

    for path in sorted(work.glob("bench-*.json"), key=order):
        bench = load_json(path)
        k_of_file = order(path)[1]
        ks = (k_of_file,) if k_of_file else KS
        for k, timing in zip(ks, bench["models"][1:]):
            points.append({
                "prompt_len": bench["prompt_len"], "k": k,
                "decode_speedup": timing["decode_speedup"],
                "predicted_decode_bytes": timing["predicted_decode_speedup_bytes"],
                "predicted_decode_macs": timing["predicted_decode_speedup"],
                "prefill_speedup": timing["prefill_speedup"],
                "predicted_prefill_macs": timing["predicted_prefill_speedup"],
                "decode_tok_s": timing["decode_tok_s"], "decode_tok_s_runs": timing["decode_tok_s_runs"],
                "original_decode_tok_s": bench["models"][0]["decode_tok_s"],
                "original_prefill_ms": bench["models"][0]["prefill_ms"],
            })
        runs, gen = bench["runs"], bench["gen"]
    return {"model": "SmolLM2-135M-Instruct (Optimum fp32)", "runs": runs, "gen": gen, "points": points}


def table(r: dict) -> str:
    rows = ["| prompt | k | decode: measured | predicted (bytes) | predicted (multiply-adds) | prefill: measured "
            "| predicted (multiply-adds) | original decode |",
            "|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        rows.append(
            f"| {p['prompt_len']} | {p['k']} | {p['decode_speedup']:.3f}× | {p['predicted_decode_bytes']:.3f}× "
            f"| {p['predicted_decode_macs']:.3f}× | {p['prefill_speedup']:.3f}× | {p['predicted_prefill_macs']:.3f}× "
            f"| {p['original_decode_tok_s']:.1f} tokens/s |")
    return "\n".join(rows) + "\n"


def svg(r: dict) -> str:
    """Measured decode speed-up against prompt length (log scale), one line per k, the bytes prediction dashed."""
    width, height, margin = 640, 360, 56
    lengths = sorted({p["prompt_len"] for p in r["points"]})
    values = [v for p in r["points"] for v in (p["decode_speedup"], p["predicted_decode_bytes"])]
    low, high = min(1.0, min(values)), max(values) * 1.05
    import math

    def x_of(n: int) -> float:
        span = math.log2(lengths[-1] / lengths[0]) or 1.0
        return margin + (width - 2 * margin) * math.log2(n / lengths[0]) / span

    def y_of(v: float) -> float:
        return height - margin - (height - 2 * margin) * (v - low) / (high - low)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{margin}" y="22" font-size="13">Decode speed-up against prompt length: measured (solid), '
           'predicted by bytes read (dashed)</text>']
    for n in lengths:
        out.append(f'<line x1="{x_of(n):.1f}" x2="{x_of(n):.1f}" y1="{margin}" y2="{height - margin}" stroke="#eee"/>'
                   f'<text x="{x_of(n):.1f}" y="{height - margin + 14}" text-anchor="middle">{n}</text>')
    for i in range(5):
        v = low + (high - low) * i / 4
        out.append(f'<line x1="{margin}" x2="{width - margin}" y1="{y_of(v):.1f}" y2="{y_of(v):.1f}" stroke="#eee"/>'
                   f'<text x="{margin - 6}" y="{y_of(v) + 4:.1f}" text-anchor="end">{v:.2f}x</text>')
    colours = {4: "#4878a8", 8: "#e8891d", 12: "#59a14f"}
    for j, k in enumerate(KS):
        points = [p for p in r["points"] if p["k"] == k]
        for key, dash in (("decode_speedup", ""), ("predicted_decode_bytes", ' stroke-dasharray="5 3"')):
            line = " ".join(f"{x_of(p['prompt_len']):.1f},{y_of(p[key]):.1f}" for p in points)
            out.append(f'<polyline points="{line}" fill="none" stroke="{colours[k]}" stroke-width="1.8"{dash}/>')
        out.append(f'<text x="{margin + 10}" y="{margin + 16 + 15 * j}" fill="{colours[k]}">NBL k = {k}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">prompt tokens (log scale)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    result = collect(args.work)
    write_json(LONG_JSON, result)
    text = table(result)
    splice(results_page("long-context"), "long-context", text)
    (RESULTS / "long-context.svg").write_text(svg(result))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
