"""The GitHub Action (action.yml) run locally: its inputs' defaults and its check step's command and
environment are read from action.yml, and the step runs as GitHub would run it, with files standing in
for GITHUB_STEP_SUMMARY and GITHUB_OUTPUT. scripts/test-wheel.sh runs it with the wheel's virtualenv
(the action's own install step is that pip install). Standard library only.

    python test_action.py REPO MODEL_DIR
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def action_step(action: str) -> tuple[dict[str, str], str, dict[str, str]]:
    """(input defaults, the check step's command, its environment as NAME -> input name)."""
    defaults: dict[str, str] = {}
    section, current = None, None
    for line in action.splitlines():
        if re.match(r"^\S", line):
            section = line.split(":")[0]
        if section == "inputs":
            if m := re.match(r"^  ([a-z0-9-]+):\s*$", line):
                current = m[1]
                defaults[current] = ""
            elif current and (m := re.match(r'^    default:\s*"?(.*?)"?\s*$', line)):
                defaults[current] = m[1]
    step = action[action.index("id: check"):]
    command = re.search(r"run: (.+)", step)[1]
    env = dict(re.findall(r"(NBL_[A-Z_]+): \$\{\{ inputs\.([a-z0-9-]+) \}\}", step))
    return defaults, command, env


def run_step(repo: Path, work: Path, name: str, inputs: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    defaults, command, env_inputs = action_step((repo / "action.yml").read_text())
    unknown = set(inputs) - set(defaults)
    assert not unknown, f"not inputs of action.yml: {unknown}"
    summary, output = work / f"{name}.summary.md", work / f"{name}.output"
    env = dict(os.environ, GITHUB_ACTION_PATH=str(repo), GITHUB_STEP_SUMMARY=str(summary),
               GITHUB_OUTPUT=str(output))
    for var, input_name in env_inputs.items():
        env[var] = inputs.get(input_name, defaults.get(input_name, ""))
    # The step's `python` is the one the action installed the wheel into: this one.
    command = command.replace("python ", f"{sys.executable} ", 1)
    code = subprocess.run(["bash", "-c", command], env=env, cwd=work).returncode
    outputs = dict(l.split("=", 1) for l in output.read_text().splitlines()) if output.exists() else {}
    return code, summary.read_text() if summary.exists() else "", outputs


def main(repo: Path, model_dir: Path) -> None:
    work = model_dir
    model = str(model_dir / "model.onnx")
    code, summary, outputs = run_step(repo, work, "pass", {
        "model": model, "rewrite": "true", "output": "out/model.onnx", "rewrite-args": "--layers 1",
        "max-kl": "0.5", "min-top1": "0.3"})
    assert code == 0, summary
    assert summary.startswith("## nbl-onnx check\n\n**Passed**"), summary
    assert "| mean KL(reference ‖ model) |" in summary and "| top-1 agreement |" in summary, summary
    assert "Rewritten: attention " in summary and "| onnxruntime" in summary, summary
    assert outputs["passed"] == "true" and float(outputs["kl"]) > 0, outputs
    assert outputs["model"].endswith("out/model.onnx") and (work / outputs["report"]).is_file(), outputs

    # A gate that cannot pass fails the step, and the summary says why.
    code, summary, outputs = run_step(repo, work, "fail", {
        "model": "out/model.onnx", "reference": model, "max-kl": "1e-12"})
    assert code == 1, summary
    assert "**Failed**" in summary and "**Problems:**" in summary and "KL" in summary, summary
    assert outputs["passed"] == "false", outputs

    # A damaged model: exit 2, named in the summary.
    (work / "damaged.onnx").write_bytes(b"not a model")
    code, summary, _ = run_step(repo, work, "bad", {"model": "damaged.onnx", "reference": model})
    assert code == 2 and "**Bad input:**" in summary and "damaged.onnx" in summary, summary
    print("the action's step works")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
