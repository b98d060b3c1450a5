#!/usr/bin/env python3
"""One-command entry point: make or refresh `.venv`, then run the dev stack or the test suite.

    python3 bootstrap.py dev [args...]    ->  .venv/bin/quota dev [args...]
    python3 bootstrap.py test [args...]   ->  .venv/bin/python scripts/run_tests.py [args...]

Standard library only, so it runs on a bare `python3` (3.11 or newer). `.venv` is created when
missing; `pip install -e .[dev]` runs only when pyproject.toml changed since the last successful
install (its SHA-256 is kept in `.venv/.quota-install-stamp`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".quota-install-stamp"
PYPROJECT = ROOT / "pyproject.toml"
MIN_PYTHON = (3, 11)

USAGE = "usage: python3 bootstrap.py {dev|test} [args...]"


def say(message: str) -> None:
    print(f"[bootstrap] {message}", file=sys.stderr, flush=True)


def run_quietly(args: list[str], what: str) -> None:
    """Run `args` with its output captured; show the output and exit only when it fails."""
    with tempfile.TemporaryFile() as output:
        result = subprocess.run(
            args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
        if result.returncode != 0:
            output.seek(0)
            sys.stderr.write(output.read().decode(errors="replace"))
            say(f"{what} failed (exit code {result.returncode}): {' '.join(args)}")
            sys.exit(result.returncode or 1)


def venv_works() -> bool:
    if not PYTHON.exists():
        return False
    check = "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)"
    try:
        result = subprocess.run(
            [str(PYTHON), "-c", check], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError:
        return False
    return result.returncode == 0


def ensure_venv() -> None:
    if venv_works():
        return
    if sys.version_info < MIN_PYTHON:
        say(
            f"Python {'.'.join(map(str, MIN_PYTHON))}+ is required to create .venv; "
            f"this is {sys.version.split()[0]}"
        )
        sys.exit(1)
    if VENV.exists():
        say(f"{VENV} is broken or too old; recreating it")
        STAMP.unlink(missing_ok=True)
        args = [sys.executable, "-m", "venv", "--clear", str(VENV)]
    else:
        say(f"creating {VENV}")
        args = [sys.executable, "-m", "venv", str(VENV)]
    run_quietly(args, "creating the virtualenv")


def ensure_installed() -> None:
    digest = hashlib.sha256(PYPROJECT.read_bytes()).hexdigest()
    try:
        if STAMP.read_text().strip() == digest:
            return
    except OSError:
        pass
    say("installing the project and its dev dependencies into .venv (pyproject.toml changed)")
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    run_quietly([*pip, "install", "--upgrade", "pip"], "upgrading pip")
    run_quietly([*pip, "install", "--editable", ".[dev]"], "installing the project")
    STAMP.write_text(digest + "\n")
    say("done")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("dev", "test"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    ensure_venv()
    ensure_installed()
    os.chdir(ROOT)
    if command == "dev":
        quota = BIN / ("quota.exe" if os.name == "nt" else "quota")
        target = [str(quota), "dev", *rest]
    else:
        target = [str(PYTHON), str(ROOT / "scripts" / "run_tests.py"), *rest]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(target[0], target)  # noqa: S606 (replace this process)


if __name__ == "__main__":
    main(sys.argv[1:])
