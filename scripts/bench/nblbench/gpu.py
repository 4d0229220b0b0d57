"""The device check's results (``scripts/gpu-check.sh``).

    python3 -m nblbench.gpu model W NAME K SAMPLES SEQ_LEN > W/result.json
    python3 -m nblbench.gpu combine OUT GPU EP RESULT.json...

``model`` turns one model's work folder (``bench.json``, ``calibrate-{host,graph}.log``,
``analyze-{host,graph}.json``, ``rewrite.json``, ``check.json``, ``check-tensorrt.{json,err}``) into one
JSON result: calibration speed both ways against the model's own prefill, whether both ways rank the
layers alike, the rewrite, both checks and the bench. ``combine`` writes them to OUT (``bench/gpu.json``
by default) and, when OUT is in ``bench/``, a table into ``docs/results/gpu.md``, in the block named after
OUT's stem (``gpu``, ``gpu-fp16``, ...); a trial run written elsewhere leaves the docs alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nblbench.common import REPO, load_json, load_json_or_none, md_table, thousands, times, tokens_per_s, write_json
from nblbench.splice import publish

#: How the docs name the models the check has run on (the model directories' names).
LABELS = {
    "smollm2-int4-cuda": "SmolLM2-135M int4 (CUDA)",
    "llama1b": "Llama-3.2-1B shape, fp16",
    "bf16": "Llama fixture's shape, GenAI `-p bf16 -e cuda`",
}
#: Below this share of the model's prefill speed, calibration's rate is shown without the ratio: it then
#: measures the host's per-run overhead on a toy model, not calibration.
MIN_SHOWN_RATIO = 0.1


def model_result(w: Path, name: str, k: int, samples: int, seq_len: int) -> dict:
    """One model's result, from its work folder ``w``."""
    bench = load_json(w / "bench.json")
    prefill_tok_s = int(bench["prompt_len"]) / (bench["models"][0]["prefill_ms"] / 1000)
    calibration = {"samples": samples, "seq_len": seq_len, "prefill_tokens_per_s": prefill_tok_s}
    for moments in ("host", "graph"):
        rate = tokens_per_s(w / f"calibrate-{moments}.log")
        calibration[f"{moments}_tokens_per_s"] = rate
        calibration[f"{moments}_relative_to_inference"] = rate / prefill_tok_s
    analyses = {m: load_json(w / f"analyze-{m}.json") for m in ("host", "graph")}
    calibration["bound_max_relative_difference"] = max(
        abs(h["bound"] - g["bound"]) / max(abs(h["bound"]), 1e-300)
        for h, g in zip(analyses["host"]["layers"], analyses["graph"]["layers"]))
    calibration["same_ranking"] = analyses["host"]["order"] == analyses["graph"]["order"]
    err_file = w / "check-tensorrt.err"
    err = err_file.read_text().strip().splitlines() if err_file.exists() else []
    return {
        "model": name, "k": k,
        "calibration": calibration,
        "rewrite": load_json_or_none(w / "rewrite.json"),
        "check": load_json_or_none(w / "check.json"),
        "check_tensorrt": load_json_or_none(w / "check-tensorrt.json") or {"error": err[-1] if err else None},
        "bench": bench,
    }


def combine(gpu: str, ep: str, results: list[dict]) -> dict:
    """The check's file: the device, the execution provider and every model's result."""
    return {"gpu": gpu, "ep": ep, "models": results}


def label(name: str) -> str:
    """How the docs name a model: from :data:`LABELS`, else ``fixture `NAME``` for a directory under
    fixtures/, else the name in backticks."""
    if name in LABELS:
        return LABELS[name]
    return f"fixture `{name}`" if (REPO / "fixtures" / name).is_dir() else f"`{name}`"


def _rate(rate: float, ratio: float) -> str:
    """A calibration rate, with its share of the prefill speed where that share means something."""
    shown = f"{thousands(rate)} tokens/s"
    return f"{shown} ({ratio:.2f}×)" if ratio >= MIN_SHOWN_RATIO else shown


def table(result: dict) -> str:
    """The generated block of docs/results/gpu.md: one row per model."""
    header = ["model", "k", "calibration, moments on the host", "in the graph", "prefill alone",
              "prefill speed-up", "decode speed-up (predicted: MACs, bytes)"]
    rows = []
    for m in result["models"]:
        c = m["calibration"]
        layers = len(m["rewrite"]["layers"]) if m.get("rewrite") else "?"
        rewritten = m["bench"]["models"][1]
        rows.append([
            label(m["model"]),
            f"{m['k']} of {layers}",
            _rate(c["host_tokens_per_s"], c["host_relative_to_inference"]),
            _rate(c["graph_tokens_per_s"], c["graph_relative_to_inference"]),
            f"{thousands(c['prefill_tokens_per_s'])} tokens/s",
            times(rewritten["prefill_speedup"]),
            f"{times(rewritten['decode_speedup'])} ({times(rewritten['predicted_decode_speedup'])}, "
            f"{times(rewritten['predicted_decode_speedup_bytes'])})",
        ])
    caption = f"{result['gpu']}; execution provider {result['ep']}:"
    return caption + "\n\n" + "\n".join(md_table(header, rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: ``model`` prints one result; ``combine`` writes OUT and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", help="print one model's result as JSON")
    p.add_argument("w", type=Path)
    p.add_argument("name")
    p.add_argument("k", type=int)
    p.add_argument("samples", type=int)
    p.add_argument("seq_len", type=int)
    p = sub.add_parser("combine", help="write the check's JSON and its table")
    p.add_argument("out", type=Path)
    p.add_argument("gpu")
    p.add_argument("ep")
    p.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "model":
        print(json.dumps(model_result(args.w, args.name, args.k, args.samples, args.seq_len), indent=2))
        return 0
    result = combine(args.gpu, args.ep, [load_json(f) for f in args.results])
    write_json(args.out, result)
    text = table(result)
    print(text)
    publish(args.out, "gpu", args.out.stem, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
