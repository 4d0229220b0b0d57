"""The Python API as a script would use it, against the installed wheel (scripts/test-wheel.sh runs it
in the wheel's fresh virtualenv, in a folder holding a copy of a fixture; standard library only).

    python test_api.py MODEL_DIR
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import nbl_onnx


def expect(exception, call):
    try:
        call()
    except exception as e:
        return e
    raise AssertionError(f"expected {exception.__name__}")


def main(model_dir: Path) -> None:
    model = model_dir / "model.onnx"
    out = model_dir / "out" / "model.onnx"

    # The three calls scripts rely on, as written.
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("nbl_onnx").addHandler(handler)
    logging.getLogger("nbl_onnx").setLevel(logging.INFO)
    report = nbl_onnx.rewrite(str(model), output=str(out), layers=1)
    assert isinstance(report, nbl_onnx.RewriteReport)
    assert len(report.layers) == 1 and report.layers == report.raw["selected"], report
    assert report.output == out and out.is_file(), report.output
    # The report it returns is the one it wrote.
    assert report.report.is_file() and json.loads(report.report.read_text()) == report.raw
    assert report.summary["kv_bytes_per_token_after"] < report.summary["kv_bytes_per_token_before"]
    # Progress went to the logger, line by line, as the CLI prints it.
    assert any(l.startswith("wrote ") for l in lines), lines

    checked = nbl_onnx.check(str(out), reference=str(model))
    assert isinstance(checked, nbl_onnx.CheckReport) and checked.passed
    assert checked.kl is not None and checked.kl > 0, checked
    assert 0 <= checked.top1 <= 1

    # A damaged model: BadInput, naming the file; the CLI's exit 2.
    damaged = model_dir / "damaged.onnx"
    damaged.write_bytes(model.read_bytes()[:1000])
    error = expect(nbl_onnx.BadInput, lambda: nbl_onnx.rewrite(damaged, output=model_dir / "never.onnx"))
    assert "damaged.onnx" in error.message and error.returncode == 2, error.message
    assert isinstance(error, ValueError)
    assert not (model_dir / "never.onnx").exists()
    # An unknown keyword is bad input too: it is the CLI's unknown flag.
    error = expect(nbl_onnx.BadInput, lambda: nbl_onnx.check(out, no_such_flag=1))
    assert "--no-such-flag" in error.message, error.message

    # Arguments of the wrong type or range: BadInput naming the argument, before or by the command.
    for call, named in [
        (lambda: nbl_onnx.rewrite(model, output=model_dir / "never.onnx", layers={"n": 1}), "layers={'n': 1}"),
        (lambda: nbl_onnx.rewrite(model, output=model_dir / "never.onnx", layers=-1), "keyword argument layers"),
        (lambda: nbl_onnx.check(123), "argument model=123"),
        (lambda: nbl_onnx.bench(), "at least one model"),
        (lambda: nbl_onnx.calibrate(model, output=model_dir / "s.safetensors", seq_len=0), "keyword argument seq_len"),
    ]:
        error = expect(nbl_onnx.BadInput, call)
        assert named in error.message, (named, error.message)
    assert not (model_dir / "never.onnx").exists() and not (model_dir / "s.safetensors").exists()

    # A gate that fails: CheckFailed carrying the report; the CLI's exit 1.
    failed = expect(nbl_onnx.CheckFailed, lambda: nbl_onnx.check(out, reference=model, max_kl=1e-12))
    assert failed.report.kl > 1e-12 and not failed.report.passed, failed.report
    assert any("KL" in p for p in failed.report.problems), failed.report.problems

    # The other calls, progress to a callback instead of the logger.
    seen: list[str] = []
    stats = nbl_onnx.calibrate(model, output=model_dir / "stats.safetensors", samples=4, seq_len=32,
                               progress=seen.append)
    assert stats.layers == 3 and stats.tokens == 4 * 32 and stats.output.is_file(), stats
    assert any(l.startswith("calibrated ") for l in seen), seen
    analysis = nbl_onnx.analyze(stats.output, layers=2)
    assert len(analysis.selected) == 2 and sorted(analysis.order) == [0, 1, 2], analysis
    by_budget = nbl_onnx.rewrite(model, output=model_dir / "budget" / "model.onnx", stats=stats.output,
                                 layer_ids=[0, 2])
    assert by_budget.layers == [0, 2], by_budget.layers
    scores = nbl_onnx.eval(model, out, samples=2, seq_len=32, gen_prompts=1, gen_tokens=4)
    assert len(scores.models) == 2 and scores.models[0]["ppl"] > 1, scores
    timing = nbl_onnx.bench(model, out, prompt_len=16, gen=4, runs=1)
    assert len(timing.models) == 2 and timing.models[1]["decode_speedup"] > 0, timing

    # Ctrl-C: the command is interrupted, removes what it had begun, and KeyboardInterrupt goes on.
    interrupted = model_dir / "interrupted"

    def interrupt_soon():
        time.sleep(1.5)
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=interrupt_soon, daemon=True).start()
    started = time.monotonic()
    expect(KeyboardInterrupt, lambda: nbl_onnx.calibrate(model, output=interrupted / "s.safetensors",
                                                         samples=5000, seq_len=64))
    assert time.monotonic() - started < 60
    assert not (interrupted / "s.safetensors").exists(), list(interrupted.glob("*"))
    print("the Python API works")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
