"""Running the bundled `nbl-onnx` executable: arguments from keywords, progress to logging, exit
codes to exceptions, Ctrl-C passed on so that the command removes what it had begun to write."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger("nbl_onnx")

#: A function given each line the command reports while it runs (what the CLI prints on stderr).
Progress = Callable[[str], None]

EXE = "nbl-onnx.exe" if sys.platform == "win32" else "nbl-onnx"


class NblError(Exception):
    """A command failed; ``message`` is what it said, ``command`` the arguments it ran with."""

    def __init__(self, message: str, command: Sequence[str], returncode: int):
        super().__init__(message)
        self.message = message
        self.command = list(command)
        self.returncode = returncode


class BadInput(NblError, ValueError):
    """Bad input: a damaged or unsupported model, a missing file, a flag out of range (CLI exit 2).
    The message names the file, node, tensor or flag."""


class CheckFailed(NblError):
    """A check or quality gate failed (CLI exit 1). ``report`` holds the check's full report."""

    def __init__(self, message: str, command: Sequence[str], report: Any):
        super().__init__(message, command, 1)
        self.report = report


def binary() -> str:
    """The `nbl-onnx` executable: ``$NBL_ONNX_BINARY``, else the one this package's wheel installed
    beside the interpreter's scripts, else the first on the PATH."""
    override = os.environ.get("NBL_ONNX_BINARY")
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"NBL_ONNX_BINARY={override} is not an executable")
        return override
    candidates = [Path(sysconfig.get_path("scripts")) / EXE]
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        candidates.append(Path(sysconfig.get_path("scripts", scheme=user_scheme)) / EXE)
    candidates.append(Path(sys.executable).parent / EXE)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(EXE)
    if found:
        return found
    raise FileNotFoundError(
        "the nbl-onnx executable was not found beside this Python or on the PATH: reinstall the "
        "nbl-onnx wheel, or set NBL_ONNX_BINARY")


def flags(options: dict) -> list[str]:
    """Keyword arguments as command-line flags, named as on the command line with `-` written as `_`:
    ``max_kl=0.2`` -> ``--max-kl=0.2``; ``True`` -> the bare flag; ``False`` and ``None`` -> nothing;
    a list or tuple -> the flag once per item."""
    out: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        # `--flag=value`, so that a value starting with `-` stays a value.
        elif isinstance(value, (list, tuple)):
            out += [f"{flag}={scalar(key, item)}" for item in value]
        else:
            out.append(f"{flag}={scalar(key, value)}")
    return out


def scalar(key: str, value: Any) -> str:
    """One flag value as the command line spells it; refuses what no flag takes, naming the keyword."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, os.PathLike)):
        raise BadInput(f"keyword argument {key}={value!r}: expected a string, number or path"
                       f"{'' if isinstance(value, bool) else ' (or a list of them)'}", [], 2)
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def path(key: str, value: Any) -> str:
    """A path argument, refused by name when it is not one."""
    if not isinstance(value, (str, os.PathLike)):
        raise BadInput(f"argument {key}={value!r}: expected a path (str or os.PathLike)", [], 2)
    return os.fspath(value)


def run(args: Sequence[str], progress: Optional[Progress] = None) -> tuple[int, str, str]:
    """Runs ``nbl-onnx ARGS``: returns (exit code, stdout, the last error line). Every line it reports
    goes to ``progress`` where given, else to the ``nbl_onnx`` logger at INFO. On KeyboardInterrupt
    the command is interrupted too (it removes the outputs it had begun), then the interrupt goes on."""
    command = [binary(), *args]
    logger.debug("running %s", subprocess.list2cmdline(command))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    lines: list[str] = []
    # stdout is read beside stderr: a large report must not fill its pipe while progress is read.
    captured: list[str] = []
    reader = threading.Thread(target=lambda: captured.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            lines.append(line)
            if progress is not None:
                progress(line)
            else:
                logger.info("%s", line)
        code = proc.wait()
        reader.join()
        stdout = captured[0] if captured else ""
    except BaseException:
        # Ctrl-C at a terminal reaches the command too; from elsewhere (a notebook's stop button,
        # a signal to this process) it does not: pass it on, give it time to clean up, then stop it.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    error = next((l[len("error: "):] for l in reversed(lines) if l.startswith("error: ")), None)
    if code == 2:
        message = error or "bad input (exit 2)"
        # The flag a message names, as the keyword argument it came from.
        flag = re.search(r"--([a-z][a-z0-9-]*)", message)
        if flag:
            message += f" (keyword argument {flag[1].replace('-', '_')})"
        raise BadInput(message, command, code)
    if code not in (0, 1):
        detail = error or (lines[-1] if lines else "no message")
        raise NblError(f"nbl-onnx exited with {code}: {detail}", command, code)
    return code, stdout, error or ""
