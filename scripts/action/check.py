#!/usr/bin/env python3
"""The GitHub Action's step (action.yml): optionally rewrite a model, then check it against the original
with the quality gates, write the agreement table to the job summary and the results to the step's
outputs, and fail the step when a gate fails.

Inputs come as the environment the action sets: NBL_MODEL, NBL_REFERENCE, NBL_REWRITE ("true" to rewrite
NBL_MODEL first, into NBL_OUTPUT), NBL_REWRITE_ARGS, NBL_MAX_KL, NBL_MIN_TOP1, NBL_MIN_COMMON_TOKENS,
NBL_CHECK_ARGS, NBL_EP, NBL_REPORT (where the check's JSON goes; default nbl-check.json). GITHUB_STEP_SUMMARY and GITHUB_OUTPUT are the files GitHub gives every step; run
by hand, set them to any files. Exit codes: 0 passed, 1 a gate or check failed, 2 bad input.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import nbl_onnx


def env(name: str) -> str:
    return os.environ.get(name, "").strip()


def extra_flags(text: str) -> list[str]:
    return shlex.split(text) if text else []


def gate_flags() -> list[str]:
    out = []
    for name, flag in (("NBL_MAX_KL", "--max-kl"), ("NBL_MIN_TOP1", "--min-top1"),
                       ("NBL_MIN_COMMON_TOKENS", "--min-common-tokens")):
        if env(name):
            out += [flag, env(name)]
    return out


def summary(report: dict | None, rewrite: dict | None, error: str | None, model: str, reference: str) -> str:
    """The job summary: verdict, the agreement table, the rewrite's savings, problems and notes."""
    lines = ["## nbl-onnx check", ""]
    if report is None:
        return "\n".join(lines + [f"**Bad input:** {error}", ""])
    passed = not report["problems"]
    lines.append(f"**{'Passed' if passed else 'Failed'}**: `{model}` against `{reference or '(no reference)'}`")
    lines.append("")
    if rewrite is not None:
        r = rewrite["rewrite"]
        units = ", ".join(f"{u['kind']} {u.get('layer', '')}".strip() for u in r["units"])
        lines += [f"Rewritten: {units}; weights {r['weights_before']['bytes'] / 1e6:.1f} MB -> "
                  f"{r['weights_after']['bytes'] / 1e6:.1f} MB; KV cache {r['kv_bytes_per_token_before']} -> "
                  f"{r['kv_bytes_per_token_after']} bytes/token.", ""]
    agreement = report.get("reference")
    if agreement:
        lines += ["| measure | value |", "|---|---|",
                  f"| mean KL(reference ‖ model) | {agreement['mean_kl']:.4g} |",
                  f"| top-1 agreement | {agreement['top1_agreement']:.3f} |",
                  f"| max abs logit difference | {agreement['max_abs_logit_diff']:.4g} |",
                  f"| positions compared | {agreement['positions']} |"]
        generation = agreement.get("generation")
        if generation:
            lines.append(f"| greedy tokens in common (mean of {generation['prompts']} prompts) | "
                         f"{generation['mean_common_tokens']:.2f} of {generation['tokens']} |")
        lines.append("")
    lines += ["| engine | status |", "|---|---|"]
    lines += [f"| {run['engine']} | {run['status']} |" for run in report["runs"]]
    lines.append("")
    for title, items in (("Problems", report["problems"]), ("Notes", report["notes"])):
        if items:
            lines += [f"**{title}:**", ""] + [f"- {item}" for item in items] + [""]
    return "\n".join(lines)


def append(path_var: str, text: str) -> None:
    path = os.environ.get(path_var)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def main() -> int:
    model, reference = env("NBL_MODEL"), env("NBL_REFERENCE")
    if not model:
        print("error: the action's input 'model' is empty", file=sys.stderr)
        return 2
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rewrite = None
    gates = {"max_kl": env("NBL_MAX_KL") or None, "min_top1": env("NBL_MIN_TOP1") or None,
             "min_common_tokens": env("NBL_MIN_COMMON_TOKENS") or None, "ep": env("NBL_EP") or None}
    try:
        if env("NBL_REWRITE") == "true":
            reference = reference or model
            rewrite = nbl_onnx.rewrite(model, output=env("NBL_OUTPUT") or None, progress=progress,
                                       extra_args=extra_flags(env("NBL_REWRITE_ARGS"))).raw
            model = rewrite["output"]
        try:
            report = nbl_onnx.check(model, reference=reference or None, progress=progress,
                                    extra_args=extra_flags(env("NBL_CHECK_ARGS")), **gates).raw
        except nbl_onnx.CheckFailed as e:
            report = e.report.raw
    except nbl_onnx.BadInput as e:
        append("GITHUB_STEP_SUMMARY", summary(None, None, e.message, model, reference))
        print(f"::error::{e.message}")
        return 2
    except nbl_onnx.CheckFailed as e:  # the rewrite: nothing met the budget
        append("GITHUB_STEP_SUMMARY", f"## nbl-onnx check\n\n**Failed:** {e.message}\n")
        print(f"::error::{e.message}")
        return 1
    append("GITHUB_STEP_SUMMARY", summary(report, rewrite, None, model, reference))
    agreement = report.get("reference") or {}
    outputs = {"passed": str(not report["problems"]).lower(), "model": model,
               "kl": agreement.get("mean_kl", ""), "top1": agreement.get("top1_agreement", ""),
               "report": env("NBL_REPORT") or "nbl-check.json"}
    Path(outputs["report"]).write_text(json.dumps(report, indent=2) + "\n")
    append("GITHUB_OUTPUT", "".join(f"{k}={v}\n" for k, v in outputs.items()))
    for problem in report["problems"]:
        print(f"::error::{problem}")
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
