"""Repository paths and small helpers shared by the benchmark modules."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: The repository root (this file is scripts/bench/nblbench/common.py).
REPO = Path(__file__).resolve().parents[3]
#: Raw benchmark results: JSON only.
BENCH = REPO / "bench"
#: Generated result pages: Markdown with generated blocks, and charts.
RESULTS = REPO / "docs" / "results"


def load_json(path: Path | str) -> Any:
    """The JSON value in the file at ``path``."""
    return json.loads(Path(path).read_text())


def load_json_or_none(path: Path | str) -> Any:
    """The JSON value in ``path``, or ``None`` when the file is missing or empty (a step that failed)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    return load_json(path)


def write_json(path: Path | str, value: Any) -> Path:
    """Writes ``value`` to ``path`` as indented JSON with a final newline; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path


def tokens_per_s(log: Path | str) -> float:
    """The rate ``nbl-onnx calibrate`` reports on stderr, ``(... tokens/s``, read from its log."""
    match = re.search(r"\(([\d.]+) tokens/s", Path(log).read_text())
    if match is None:
        raise SystemExit(f"error: {log} holds no '(N tokens/s' line: did calibrate finish?")
    return float(match.group(1))


def bytes_on_disk(model_dir: Path | str) -> int:
    """Bytes of a model directory's ``model.onnx`` and its external data files (``model.onnx*``)."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.name.startswith("model.onnx"))


def times(x: float) -> str:
    """A ratio as the docs print it: ``1.07×``."""
    return f"{x:.2f}×"


def thousands(x: float) -> str:
    """A rate as the docs print it: ``4,161``."""
    return f"{x:,.0f}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
