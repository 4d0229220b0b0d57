"""Neural Block Linearization for exported ONNX LLMs, from Python.

Plain functions, paths in, typed results out, in the style of ``onnxruntime.quantization``::

    import nbl_onnx

    report = nbl_onnx.rewrite("m.onnx", output="out/m.onnx", layers=1)
    report.layers                        # [12]: the layers replaced
    check = nbl_onnx.check("out/m.onnx", reference="m.onnx", max_kl=0.1)
    check.kl                             # mean KL(reference || rewrite) per position

Keyword arguments are the command line's flags with ``-`` written as ``_`` (``max_kl=0.2`` is
``--max-kl 0.2``; ``True`` is a bare flag; a list repeats the flag); ``nbl-onnx COMMAND --help`` lists
them; ``extra_args=[...]`` appends arguments verbatim. Each function runs the ``nbl-onnx`` executable installed by the same wheel, so a call behaves
exactly as the command does (its outputs are written whole or not at all) and never holds the GIL
while it works. What the command reports as it runs goes to the ``nbl_onnx`` logger at INFO, or to
``progress=callable`` (one line per call). Ctrl-C interrupts the command, which removes what it had
begun to write, then raises KeyboardInterrupt as usual.

Errors: :class:`BadInput` (the command's exit 2: a damaged or unsupported model, a missing file, a
flag out of range), :class:`CheckFailed` (exit 1: a check or quality gate failed, or no choice met a
budget), :class:`NblError` for anything else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from nbl_onnx._run import BadInput, CheckFailed, NblError, Progress, binary, flags, path, run

__all__ = [
    "calibrate", "analyze", "rewrite", "check", "eval", "bench",
    "CalibrateResult", "AnalyzeReport", "RewriteReport", "CheckReport", "EvalReport", "BenchReport",
    "BadInput", "CheckFailed", "NblError", "binary",
]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class CalibrateResult:
    """A statistics file written by :func:`calibrate`."""

    output: Path
    #: Attention sites measured, and other units (``units=...``).
    layers: int
    units: int
    tokens: int
    raw: dict = field(repr=False)


@dataclass
class AnalyzeReport:
    """Bounds and fits of every layer in a statistics file, ranked (``analyze --json``)."""

    criterion: str
    #: Layers in the order the criterion ranks them, most linear first.
    order: list
    #: The layers the selection picks.
    selected: list
    #: One row per layer: bound, residuals, cosine, ...
    rows: list
    raw: dict = field(repr=False)


@dataclass
class RewriteReport:
    """What :func:`rewrite` did; ``raw`` is the report it wrote to ``report``."""

    output: Path
    report: Path
    #: The decoder layers whose attention was replaced (or removed).
    layers: list
    #: Every unit replaced, e.g. ``{"kind": "attention", "layer": 3}`` or ``{"kind": "run", ...}``.
    units: list
    criterion: str
    #: Calibration tokens the maps were fitted on.
    tokens: int
    #: Weights and bytes before and after, nodes, KV bytes per token, inputs and outputs removed.
    summary: dict
    #: Every layer's bound and fit (the report's ``layers``).
    analysis: list
    raw: dict = field(repr=False)


@dataclass
class CheckReport:
    """:func:`check`'s validation, runs on each engine and agreement with the reference."""

    model: str
    passed: bool
    problems: list
    notes: list
    #: Per engine: ``{"engine", "status", "decoded"}``.
    runs: list
    #: Mean KL(reference || model) over positions; None without a reference.
    kl: Optional[float]
    top1: Optional[float]
    #: Greedy continuations against the reference's, where the model has a KV cache.
    generation: Optional[dict]
    raw: dict = field(repr=False)


@dataclass
class EvalReport:
    """Perplexity of every model, and KL, top-1 and generation agreement with the first."""

    #: One entry per model: ``{"path", "ppl", "kl_vs_first", ...}``.
    models: list
    raw: dict = field(repr=False)


@dataclass
class BenchReport:
    """Prefill latency and decode throughput of every model, and speed-ups over the first."""

    #: One entry per model: ``{"path", "prefill_ms", "decode_tok_s", "decode_speedup", ...}``.
    models: list
    raw: dict = field(repr=False)


def _json(stdout: str, command: str) -> dict:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as e:
        raise NblError(f"nbl-onnx {command} printed no JSON report ({e})", [command], 0) from None


def _passed(code: int, error: str, command: list) -> None:
    if code == 1:
        raise CheckFailed(error or "nbl-onnx: not passed (exit 1)", command, None)


def calibrate(model: PathLike, *, output: PathLike, progress: Optional[Progress] = None,
              extra_args: Sequence[str] = (), **options: Any) -> CalibrateResult:
    """Measures every attention site (and ``units=...``) on calibration text and writes the statistics
    to ``output``. Options: ``data``, ``samples``, ``seq_len``, ``units``, ``moments``, ``ep``, ..."""
    args = ["calibrate", path("model", model), "-o", path("output", output), "--json", *flags(options), *extra_args]
    _, stdout, _ = run(args, progress)
    raw = _json(stdout, "calibrate")
    return CalibrateResult(output=Path(raw["output"]), layers=raw["layers"], units=raw["units"],
                           tokens=raw["tokens"], raw=raw)


def analyze(stats: PathLike, *, progress: Optional[Progress] = None, extra_args: Sequence[str] = (),
            **options: Any) -> AnalyzeReport:
    """Ranks the layers of a statistics file. Options: ``criterion``, ``layers``, ``model``, ``chart``, ..."""
    _, stdout, _ = run(["analyze", path("stats", stats), "--json", *flags(options), *extra_args], progress)
    raw = _json(stdout, "analyze")
    return AnalyzeReport(criterion=raw.get("criterion", ""), order=raw.get("order", []),
                         selected=raw.get("selected", []), rows=raw.get("layers", []), raw=raw)


def rewrite(model: PathLike, *, output: Optional[PathLike] = None, progress: Optional[Progress] = None,
            extra_args: Sequence[str] = (), **options: Any) -> RewriteReport:
    """Replaces the most linear attention blocks (or, with ``max_kl=...``, whatever is fastest within
    the budget) and writes the model to ``output`` (default ``<stem>.nbl.onnx`` beside it). Options:
    ``layers``, ``stats``, ``max_kl``, ``units``, ``report``, ``data``, ... Raises :class:`CheckFailed`
    when nothing meets a budget, or nothing would be replaced."""
    args = ["rewrite", path("model", model), "--json", *flags(options), *extra_args]
    if output is not None:
        args += ["-o", path("output", output)]
    code, stdout, error = run(args, progress)
    _passed(code, error, args)
    raw = _json(stdout, "rewrite")
    summary = raw["rewrite"]
    return RewriteReport(
        output=Path(raw["output"]),
        report=Path(raw["report"]),
        layers=list(summary.get("layers", [])),
        units=list(summary.get("units", [])),
        criterion=raw.get("criterion", ""),
        tokens=raw.get("tokens", 0),
        summary=summary,
        analysis=raw.get("layers", []),
        raw=raw,
    )


def check(model: PathLike, *, reference: Optional[PathLike] = None, progress: Optional[Progress] = None,
          extra_args: Sequence[str] = (), **options: Any) -> CheckReport:
    """Validates ``model``, runs it on ONNX Runtime and tract and, with ``reference``, compares them.
    Gates: ``max_kl``, ``min_top1``, ``min_common_tokens``. A failed check raises :class:`CheckFailed`
    whose ``report`` is this function's result."""
    args = ["check", path("model", model), "--json", *flags(options), *extra_args]
    if reference is not None:
        args += ["--reference", path("reference", reference)]
    code, stdout, error = run(args, progress)
    raw = _json(stdout, "check")
    agreement = raw.get("reference") or {}
    report = CheckReport(
        model=raw["model"], passed=not raw["problems"], problems=raw["problems"], notes=raw["notes"],
        runs=raw["runs"], kl=agreement.get("mean_kl"), top1=agreement.get("top1_agreement"),
        generation=agreement.get("generation"), raw=raw)
    if code == 1:
        raise CheckFailed("; ".join(report.problems) or error or "check failed", args, report)
    return report


def eval(*models: PathLike, progress: Optional[Progress] = None, extra_args: Sequence[str] = (),  # noqa: A001
         **options: Any) -> EvalReport:
    """Perplexity of every model on held-out text, and KL, top-1 and generation agreement with the
    first. Options: ``data``, ``samples``, ``seq_len``, ``gen_tokens``, ``ep``, ..."""
    if not models:
        raise BadInput("eval() needs at least one model", [], 2)
    _, stdout, _ = run(["eval", *(path("models", m) for m in models), "--json", *flags(options), *extra_args], progress)
    raw = _json(stdout, "eval")
    return EvalReport(models=raw.get("models", []), raw=raw)


def bench(*models: PathLike, progress: Optional[Progress] = None, extra_args: Sequence[str] = (),
          **options: Any) -> BenchReport:
    """Times every model side by side (alternating runs): prefill and decode, with speed-ups over the
    first. Options: ``prompt_len``, ``gen``, ``runs``, ``ep``, ``threads``."""
    if not models:
        raise BadInput("bench() needs at least one model", [], 2)
    _, stdout, _ = run(["bench", *(path("models", m) for m in models), "--json", *flags(options), *extra_args], progress)
    raw = _json(stdout, "bench")
    return BenchReport(models=raw.get("models", []), raw=raw)
