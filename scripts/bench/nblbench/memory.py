"""Peak memory of ``nbl-onnx calibrate`` against the number of tokens (``scripts/bench/bench-calibrate-memory.sh``).

    python3 -m nblbench.memory TMP MODEL SEQ_LEN SAMPLES...

For each SAMPLES value N the script leaves ``TMP/N.time`` (GNU time's ``%M %e``: peak RSS in KiB, wall
seconds) and ``TMP/N.bytes`` (the statistics file's size). Writes ``bench/calibrate-memory.json`` (raw)
and a table into ``docs/results/scale.md`` (block ``calibrate-memory``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblbench.common import BENCH, md_table, write_json
from nblbench.splice import results_page, splice

MEMORY_JSON = BENCH / "calibrate-memory.json"


def collect(tmp: Path, model: str, seq_len: int, samples: list[int]) -> dict:
    """One run per sample count: tokens, peak RSS (MiB), seconds and the statistics' size (MiB)."""
    runs = []
    for n in samples:
        rss_kb, seconds = (tmp / f"{n}.time").read_text().split()
        stats_bytes = int((tmp / f"{n}.bytes").read_text())
        runs.append({"samples": n, "tokens": n * seq_len, "peak_rss_mb": int(rss_kb) // 1024,
                     "seconds": float(seconds), "stats_mb": stats_bytes // 1048576})
    return {"model": model, "seq_len": seq_len, "runs": runs}


def table(result: dict) -> str:
    """The generated block: one row per run."""
    rows = [[str(r["samples"]), str(r["tokens"]), f"{r['peak_rss_mb']} MiB", f"{r['seconds']:.1f} s",
             f"{r['stats_mb']} MiB"] for r in result["runs"]]
    caption = f"`calibrate` of `{result['model']}`, sequences of {result['seq_len']} tokens (`bench/calibrate-memory.json`):"
    header = ["sequences", "tokens", "peak RSS", "wall time", "statistics file"]
    return caption + "\n\n" + "\n".join(md_table(header, rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: collect the runs, write the JSON and the table; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tmp", type=Path)
    parser.add_argument("model")
    parser.add_argument("seq_len", type=int)
    parser.add_argument("samples", type=int, nargs="+")
    args = parser.parse_args(argv)
    result = collect(args.tmp, args.model, args.seq_len, args.samples)
    write_json(MEMORY_JSON, result)
    text = table(result)
    splice(results_page("scale"), "calibrate-memory", text)
    print(text)
    print(f"wrote {MEMORY_JSON} and {results_page('scale')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
