"""NBL on the int4 GenAI export of SmolLM2-135M-Instruct, on the CPU (``scripts/bench/bench-int4.sh``).

Reads the work folder (``inspect.json``, ``k{4,8,12}.check.json``, ``k{4,8,12}.genai.json``, the rewrite
reports, ``bench.json``, ``eval.json`` and, unless the slice was skipped, ``slice-bench.json``) and writes
``bench/int4.json`` (raw) and three tables into ``docs/results/int4.md``: blocks ``int4`` (speed and size
against k), ``int4-quality`` (W's format at k = 8) and ``int4-slice`` (a slice of Llama-3-8B's shape).

    python3 -m nblbench.int4 WORK MODEL_DIR [--no-slice]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, bytes_on_disk, load_json, md_table, times, write_json
from nblbench.splice import results_page, splice

INT4_JSON = BENCH / "int4.json"
KS = (4, 8, 12)
#: The slice's model directories, in the bench run's order, and how the table names them.
SLICE = (("llama3-8b-slice", "original"), ("slice-auto", "int4 W"), ("slice-f32", "f32 W"))
#: The eval run's models after the original, in order, and how the quality table names W.
QUALITY = ("f32", "int4, GPTQ", "int4, round to nearest")


def collect(work: Path, model_dir: Path, with_slice: bool) -> dict:
    """The layer count; per k the check's KL and top-1, onnxruntime-genai's tokens, size on disk and
    weights; the bench and eval runs; and the slice's bench and sizes."""
    result = {"layers": len(load_json(work / "inspect.json")["layers"]), "rewrites": {}}
    for k in KS:
        check = load_json(work / f"k{k}.check.json")
        report = load_json(work / f"k{k}.report.json")
        result["rewrites"][str(k)] = {  # JSON keys are strings
            "check_problems": check["problems"], "kl": check["reference"]["mean_kl"],
            "top1": check["reference"]["top1_agreement"], "genai_tokens": load_json(work / f"k{k}.genai.json"),
            "bytes_on_disk": bytes_on_disk(work / f"k{k}"),
            "weights_before": report["rewrite"]["weights_before"],
            "weights_after": report["rewrite"]["weights_after"],
        }
    result["original_bytes_on_disk"] = bytes_on_disk(model_dir)
    result["bench"] = load_json(work / "bench.json")
    result["eval"] = load_json(work / "eval.json")
    if with_slice:
        result["slice_bench"] = load_json(work / "slice-bench.json")
        result["slice_bytes_on_disk"] = {d: bytes_on_disk(work / d) for d, _ in SLICE}
    return result


def _decode(m: dict) -> str:
    """A decode speed-up with its two predictions: ``1.25× (1.07×, 1.10×)``."""
    return (f"{times(m['decode_speedup'])} ({times(m['predicted_decode_speedup'])}, "
            f"{times(m['predicted_decode_speedup_bytes'])})")


def speed_table(result: dict) -> str:
    """Block ``int4``: size on disk, prefill speed-up and decode speed against k (original first)."""
    header = ["k", "size on disk", "prefill speed-up", "decode tok/s", "decode speed-up (predicted: MACs, bytes)"]
    models = result["bench"]["models"]
    original = models[0]
    rows = [["0", f"{result['original_bytes_on_disk'] / 1e6:.1f} MB", times(original["prefill_speedup"]),
             f"{original['decode_tok_s']:.1f}", times(original["decode_speedup"])]]
    for k, m in zip(KS, models[1:]):
        r = result["rewrites"][str(k)]
        rows.append([str(k), f"{r['bytes_on_disk'] / 1e6:.1f} MB", times(m["prefill_speedup"]),
                     f"{m['decode_tok_s']:.1f}", _decode(m)])
    return "\n".join(md_table(header, rows)) + "\n"


def quality_table(result: dict) -> str:
    """Block ``int4-quality``: perplexity, KL and top-1 of k = 8 with W as f32, int4 GPTQ and int4 RTN."""
    original, *rewrites = result["eval"]["models"]
    rows = [[label, f"{m['ppl']:.2f}", f"{m['kl_vs_first']:.4f}", f"{m['top1_vs_first']:.3f}"]
            for label, m in zip(QUALITY, rewrites)]
    caption = (f"Quality at k = 8 on documents 200–299, against the int4 original (perplexity "
               f"{original['ppl']:.2f}):")
    return caption + "\n\n" + "\n".join(md_table(["W", "perplexity", "KL to the original", "top-1"], rows)) + "\n"


def slice_table(result: dict) -> str:
    """Block ``int4-slice``: the Llama-3-8B-shaped slice, original and 2 layers with int4 and f32 W."""
    header = ["model", "size on disk", "prefill ms", "decode tok/s", "prefill speed-up",
              "decode speed-up (predicted: MACs, bytes)"]
    rows = []
    for (directory, label), m in zip(SLICE, result["slice_bench"]["models"]):
        rows.append([label, f"{result['slice_bytes_on_disk'][directory] / 1e6:.0f} MB", f"{m['prefill_ms']:.0f}",
                     f"{m['decode_tok_s']:.2f}", times(m["prefill_speedup"]), _decode(m)])
    return "\n".join(md_table(header, rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: collect WORK, write the JSON and the tables; print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="the work folder of bench-int4.sh")
    parser.add_argument("model_dir", type=Path, help="the original export's directory")
    parser.add_argument("--no-slice", action="store_true", help="the slice was skipped (--skip-slice)")
    args = parser.parse_args(argv)
    result = collect(args.work, args.model_dir, not args.no_slice)
    write_json(INT4_JSON, result)
    page = results_page("int4")
    blocks = [("int4", speed_table(result)), ("int4-quality", quality_table(result))]
    if not args.no_slice:
        blocks.append(("int4-slice", slice_table(result)))
    for name, text in blocks:
        splice(page, name, text)
        print(text)
    print(f"wrote {INT4_JSON} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
