#!/usr/bin/env python3
"""One-command entry point: make or refresh `.venv`, then run the dev stack or the test suite.

    python3 bootstrap.py dev [args...]    ->  .venv/bin/quota dev [args...]
    python3 bootstrap.py test [args...]   ->  .venv/bin/python scripts/run_tests.py [args...]
    python3 bootstrap.py lock [args...]   ->  pip-compile [args...]: refresh requirements/lock.txt
                                              and requirements/runtime.txt

Standard library only, so it runs on a bare `python3` (3.11 or newer). `.venv` is created when
missing. Its packages come from requirements/lock.txt, each pinned with its hashes: first pip
(its own entry in the lock), then `pip install --require-hashes -r requirements/lock.txt`, then
the project itself, `pip install --no-deps --editable .`. That runs only when pyproject.toml or
the lock changed since the last successful install (their SHA-256 is kept in
`.venv/.quota-install-stamp`).

`lock` installs pip-tools into `.venv` when missing and runs pip-compile over pyproject.toml
(with the `dev` extra) and requirements/pip.in; its arguments go to pip-compile (`--upgrade`,
`--upgrade-package NAME`). pyproject.toml keeps the ranges people chose; the lock pins exactly,
resolved for CPython 3.11 on Linux x86_64, what CI and every machine here run. It then writes
requirements/runtime.txt, the container image's lock: the same pins and hashes for the runtime
dependencies only (no `dev` extra), resolved with requirements/lock.txt as its constraints, so
the image never runs a version that CI did not.
"""

from __future__ import annotations

import hashlib
import os
import re
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
LOCK = ROOT / "requirements" / "lock.txt"
#: The Dockerfile's lock: runtime dependencies and pip, a subset of LOCK's pins.
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
#: pip itself, pinned in the lock beside the project's packages (pip-compile leaves it out
#: unless asked for it).
PIP_IN = ROOT / "requirements" / "pip.in"
MIN_PYTHON = (3, 11)
#: What the lock is resolved for: `implementation major.minor sys.platform machine`.
LOCK_PLATFORM = "CPython 3.11 linux x86_64"
#: Used only by `lock`; a known version, so the lock's format changes only on purpose.
PIP_TOOLS = "pip-tools==7.6.2"
PIP_COMPILE_FLAGS = (
    "--generate-hashes",
    "--allow-unsafe",  # pip's own pin
    "--strip-extras",
    "--no-emit-index-url",
    "--no-emit-find-links",
)

USAGE = "usage: python3 bootstrap.py {dev|test|lock} [args...]"


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


def pip_command() -> list[str]:
    return [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "--quiet"]


def venv_platform() -> str:
    """`.venv`'s Python as `implementation major.minor sys.platform machine`."""
    code = (
        "import platform, sys; "
        "print(platform.python_implementation(), '%d.%d' % sys.version_info[:2], "
        "sys.platform, platform.machine())"
    )
    result = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def install_digest() -> str:
    """SHA-256 over what an install reads: pyproject.toml (the project) and the lock."""
    digest = hashlib.sha256()
    for path in (PYPROJECT, LOCK):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def locked_entry(name: str) -> str:
    """`name`'s entry in the lock, its pin with its hashes and comments, as requirements text."""
    for entry in re.split(r"\n(?=\S)", LOCK.read_text()):
        if entry.lower().startswith(f"{name}=="):
            return entry.rstrip() + "\n"
    say(f"{LOCK.relative_to(ROOT)} pins no {name}: run `python3 bootstrap.py lock`")
    sys.exit(1)


def ensure_installed() -> None:
    if not LOCK.exists():
        say(f"{LOCK.relative_to(ROOT)} is missing: run `python3 bootstrap.py lock` to make it")
        sys.exit(1)
    digest = install_digest()
    try:
        if STAMP.read_text().strip() == digest:
            return
    except OSError:
        pass
    say(
        "installing the locked dependencies and the project into .venv "
        "(pyproject.toml or requirements/lock.txt changed)"
    )
    found = venv_platform()
    if found != LOCK_PLATFORM:
        say(f"warning: the lock is resolved for {LOCK_PLATFORM}; .venv is {found}")
    pip = pip_command()
    with tempfile.TemporaryDirectory() as scratch:
        pinned_pip = Path(scratch) / "pip.txt"
        pinned_pip.write_text(locked_entry("pip"))
        run_quietly([*pip, "install", "--require-hashes", "-r", str(pinned_pip)], "installing pip")
    run_quietly(
        [*pip, "install", "--require-hashes", "-r", str(LOCK)], "installing the locked packages"
    )
    run_quietly([*pip, "install", "--no-deps", "--editable", "."], "installing the project")
    STAMP.write_text(digest + "\n")
    say("done")


def lock(pip_compile_args: list[str]) -> None:
    """Refresh the lock with pip-compile, installing pip-tools into .venv first if missing."""
    ensure_venv()
    found = venv_platform()
    if found != LOCK_PLATFORM:
        say(f"the lock is resolved for {LOCK_PLATFORM} (what CI runs); .venv is {found}")
        sys.exit(1)
    pip_compile = BIN / ("pip-compile.exe" if os.name == "nt" else "pip-compile")
    if not pip_compile.exists():
        say(f"installing {PIP_TOOLS} into .venv")
        run_quietly([*pip_command(), "install", PIP_TOOLS], "installing pip-tools")
    inputs = [str(PYPROJECT.relative_to(ROOT)), str(PIP_IN.relative_to(ROOT))]
    compile_into(
        LOCK, [str(pip_compile), "--extra=dev", *pip_compile_args, *inputs], "a few minutes"
    )
    say(f"wrote {LOCK.relative_to(ROOT)}; the next `dev` or `test` installs it")
    # Every pin comes from LOCK (`--constraint`); `--upgrade` only stops RUNTIME_LOCK's own old
    # pins from being preferred, so it is always exactly LOCK's subset.
    constraint = f"--constraint={LOCK.relative_to(ROOT)}"
    compile_into(RUNTIME_LOCK, [str(pip_compile), constraint, "--upgrade", *inputs], "a minute")
    say(f"wrote {RUNTIME_LOCK.relative_to(ROOT)}; the Dockerfile installs it")


def compile_into(output: Path, command: list[str], duration: str) -> None:
    """Run pip-compile (`command`: its path, then arguments) with the lock's flags into `output`."""
    args = [
        command[0],
        "--quiet",
        *PIP_COMPILE_FLAGS,
        f"--output-file={output.relative_to(ROOT)}",
        *command[1:],
    ]
    say(f"resolving ({duration}): {' '.join(args[1:])}")
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "python3 bootstrap.py lock"}
    result = subprocess.run(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        say(f"pip-compile failed (exit code {result.returncode}) writing {output.name}")
        sys.exit(result.returncode)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("dev", "test", "lock"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    if command == "lock":
        lock(rest)
        return
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
