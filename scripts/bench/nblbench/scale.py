"""Statistics and rewriting at the scale of an 8B model (``scripts/bench/bench-scale.sh``).

    python3 -m nblbench.scale copy-seconds SRC DST               # time a plain copy of SRC to DST
    python3 -m nblbench.scale report WORK D LAYERS K COPY_SECONDS

``report`` reads the work folder (``{analyze,one,rewrite,calibrate-0..1,calibrate-0..2}.time`` written by
GNU time as ``%e %M``, ``stats.safetensors``, ``rewrite.report.json`` and the rewritten model) and writes
``bench/scale.json`` (raw) and a table into ``docs/results/scale.md`` (block ``scale``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

from nblbench.common import BENCH, bytes_on_disk, load_json, md_table, write_json
from nblbench.splice import results_page, splice

SCALE_JSON = BENCH / "scale.json"


def copy_seconds(src: Path, dst: Path) -> float:
    """Seconds a plain copy of ``src`` to ``dst`` takes (the disk's pace, to compare a rewrite's with)."""
    start = time.time()
    shutil.copyfile(src, dst)
    return time.time() - start


def _timed(work: Path, name: str) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of a run that GNU time measured into ``WORK/NAME.time``."""
    wall, rss_kb = (work / f"{name}.time").read_text().split()
    return float(wall), int(rss_kb) / 1024


def collect(work: Path, d: int, layers: int, k: int, copy_s: float) -> dict:
    """Sizes, wall times and peak memory of analyze (all layers, one layer), rewrite and calibration,
    with the statistics' size against format version 1 and calibration memory extrapolated to all layers."""
    analyze_s, analyze_mb = _timed(work, "analyze")
    one_s, one_mb = _timed(work, "one")
    rewrite_s, rewrite_mb = _timed(work, "rewrite")
    _, one_layer_mb = _timed(work, "calibrate-0..1")
    _, two_layers_mb = _timed(work, "calibrate-0..2")
    per_layer_mb = two_layers_mb - one_layer_mb
    out_bytes = bytes_on_disk(work / "rewritten")
    report = load_json(work / "rewrite.report.json")
    return {
        "hidden_size": d,
        "layers": layers,
        "threads": 2,
        "stats_bytes": (work / "stats.safetensors").stat().st_size,
        "stats_bytes_format_1": layers * (3 * d * d + 2 * d + 2) * 8,
        "analyze_s": analyze_s,
        "analyze_peak_rss_mb": round(analyze_mb, 1),
        "solve_s_per_layer": one_s,
        "one_layer_peak_rss_mb": round(one_mb, 1),
        "rewrite_layers": k,
        "rewrite_weight_format": report["rewrite"]["weight_format"],
        "rewrite_s": rewrite_s,
        "rewrite_peak_rss_mb": round(rewrite_mb, 1),
        "rewrite_output_bytes": out_bytes,
        "rewrite_output_mb_per_s": round(out_bytes / 1e6 / rewrite_s, 1),
        "disk_copy_s": round(copy_s, 2),
        "disk_copy_mb_per_s": round(out_bytes / 1e6 / copy_s, 1),
        "calibrate_1_layer_peak_rss_mb": round(one_layer_mb, 1),
        "calibrate_2_layers_peak_rss_mb": round(two_layers_mb, 1),
        "calibrate_per_layer_mb": round(per_layer_mb, 1),
        "calibrate_per_layer_mb_expected": round(3 * d * d * 8 / 2**20, 1),
        "calibrate_32_layers_peak_rss_mb_extrapolated": round(one_layer_mb + (layers - 1) * per_layer_mb, 1),
        "note": "rewrite = analyze of all layers + the chosen layers' fits and GPTQ + copying the weights; "
                "the model repeats one layer's weights (scripts/models/repeat_layers.py), the statistics are "
                "synthetic (nbl-onnx synthetic-stats); calibration memory is measured on the short export (the "
                "model's weights are in its base)",
    }


def storage(value) -> str:
    """The maps' storage from a rewrite report, in words: ``int4, groups of 32, gptq``, or ``f16``."""
    if isinstance(value, dict) and len(value) == 1:
        inner = next(iter(value.values()))
        if isinstance(inner, dict) and "bits" in inner:
            return f"int{inner['bits']}, groups of {inner.get('block_size', '?')}, {inner.get('quantizer', '?')}"
        return str(inner)
    return str(value)


def table(r: dict) -> str:
    """The generated block of docs/results/scale.md: every measure of one run."""
    d, layers = r["hidden_size"], r["layers"]
    rows = [
        [f"statistics file, {layers} layers at d = {d}",
         f"{r['stats_bytes'] / 1e9:.2f} GB (format 1: {r['stats_bytes_format_1'] / 1e9:.2f} GB; "
         f"{r['stats_bytes'] / r['stats_bytes_format_1']:.3f}×)"],
        [f"`analyze`, all {layers} layers", f"{r['analyze_s']:.1f} s, peak RSS {r['analyze_peak_rss_mb']:.0f} MiB"],
        ["bound + LMMSE fit of one layer (`analyze` of a one-layer file)",
         f"{r['solve_s_per_layer']:.1f} s, peak RSS {r['one_layer_peak_rss_mb']:.0f} MiB"],
        [f"`rewrite --layers {r['rewrite_layers']}` ({storage(r['rewrite_weight_format'])})",
         f"{r['rewrite_s']:.1f} s, peak RSS {r['rewrite_peak_rss_mb']:.0f} MiB, "
         f"{r['rewrite_output_bytes'] / 1e9:.2f} GB written at {r['rewrite_output_mb_per_s']:.1f} MB/s"],
        ["a plain copy of the rewrite's output", f"{r['disk_copy_mb_per_s']:.1f} MB/s"],
        ["`calibrate`, memory per layer (short export, 2 × 128 tokens)",
         f"{r['calibrate_per_layer_mb']:.1f} MiB (3d² f64: {r['calibrate_per_layer_mb_expected']:.1f} MiB); "
         f"{layers} layers extrapolated: {r['calibrate_32_layers_peak_rss_mb_extrapolated']:.0f} MiB"],
    ]
    caption = f"Measured on {r['threads']} threads (`bench/scale.json`):"
    return caption + "\n\n" + "\n".join(md_table(["measure", "value"], rows)) + "\n"


#: Every unit of a 32-layer model: attention, MLP and layer per layer, runs of 2-4 (29 + 30 + 31 = 90),
#: folds of 1-4 from layer 1 (31 + 30 + 29 + 28 = 118).
ALL_UNITS_32 = 32 + 32 + 32 + 90 + 118


def units(work: Path) -> dict:
    """Calibration with ``--units attention`` and ``--units all`` on layers 0..2 of the short export:
    wall time, peak RSS and file size of each, the memory per unit, and both extrapolated to a 32-layer
    model (32 units against ``ALL_UNITS_32``)."""
    def run(name: str) -> dict:
        wall, rss = _timed(work, f"units-{name}")
        log = (work / f"units-{name}.log").read_text()
        # "calibrated 2 layers and 6 other units on ...": every unit the run measured.
        counted = re.search(r"calibrated (\d+) layers(?: and (\d+) other units)?", log)
        return {
            "seconds": wall,
            "peak_rss_mb": round(rss, 1),
            "units": int(counted.group(1)) + int(counted.group(2) or 0),
            "stats_bytes": (work / f"units-{name}.safetensors").stat().st_size,
            "calibrated": next(line for line in log.splitlines() if line.startswith("calibrated ")),
        }
    attention, everything = run("attention"), run("all")
    per_unit = (everything["peak_rss_mb"] - attention["peak_rss_mb"]) / (everything["units"] - attention["units"])
    base = attention["peak_rss_mb"] - 2 * per_unit
    return {
        "layer_range": "0..2",
        "tokens": 256,
        "attention": attention,
        "all": everything,
        "per_unit_mb": round(per_unit, 1),
        "per_unit_mb_expected": round(3 * 4096 * 4096 * 8 / 2**20, 1),
        "layers_32_attention_mb_extrapolated": round(base + 32 * per_unit),
        "layers_32_all_mb_extrapolated": round(base + ALL_UNITS_32 * per_unit),
        "note": f"units per 32 layers: 32 attention; all = 32 attention + 32 MLP + 32 layer + 90 runs (spans 2-4) "
                f"+ 118 folds (spans 1-4, from layer 1) = {ALL_UNITS_32}",
    }


def units_table(u: dict) -> str:
    rows = []
    for name in ("attention", "all"):
        r = u[name]
        rows.append([f"`--units {name}` ({r['units']} units)", f"{r['seconds']:.1f} s", f"{r['peak_rss_mb']:.0f} MiB",
                     f"{r['stats_bytes'] / 2**20:.0f} MiB"])
    rows.append(["per unit (difference)", "", f"{u['per_unit_mb']:.0f} MiB (3d² f64: {u['per_unit_mb_expected']:.0f})", ""])
    rows.append(["32 layers, extrapolated", "",
                 f"attention {u['layers_32_attention_mb_extrapolated']:,} MiB, all {u['layers_32_all_mb_extrapolated']:,} MiB", ""])
    caption = (f"Calibrating layers {u['layer_range']} of the d = 4096 export on {u['tokens']} tokens "
               "(`bench/scale.json`, `units`):")
    return caption + "\n\n" + "\n".join(md_table(["run", "wall time", "peak RSS", "statistics file"], rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: ``copy-seconds`` prints seconds; ``report`` writes the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("copy-seconds", help="time a plain copy")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p = sub.add_parser("units", help="add the cost of --units to bench/scale.json and docs/results/scale.md")
    p.add_argument("work", type=Path)
    p = sub.add_parser("report", help="write bench/scale.json and docs/results/scale.md")
    p.add_argument("work", type=Path)
    p.add_argument("d", type=int)
    p.add_argument("layers", type=int)
    p.add_argument("k", type=int)
    p.add_argument("copy_seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "copy-seconds":
        print(copy_seconds(args.src, args.dst))
        return 0
    if args.command == "units":
        result = load_json(SCALE_JSON) if SCALE_JSON.exists() else {}
        result["units"] = units(args.work)
        write_json(SCALE_JSON, result)
        text = units_table(result["units"])
        splice(results_page("scale"), "scale-units", text)
        print(text)
        return 0
    result = collect(args.work, args.d, args.layers, args.k, args.copy_seconds)
    write_json(SCALE_JSON, result)
    text = table(result)
    splice(results_page("scale"), "scale", text)
    print(text)
    print(f"wrote {SCALE_JSON} and {results_page('scale')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
