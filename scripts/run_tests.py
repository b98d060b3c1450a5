#!/usr/bin/env python3
"""The whole check, in the project venv: ruff check, ruff format --check, mypy, pytest (extra
arguments go to pytest).

Normally started by `python3 bootstrap.py test [pytest args...]`.

Infrastructure for pytest, per variable:
  * QUOTA_TEST_DATABASE_URL / QUOTA_TEST_KAFKA_BOOTSTRAP already set: used as they are;
  * otherwise, when a Docker engine answers (`docker info`): nothing is started here, the
    pytest fixtures start testcontainers themselves;
  * otherwise PostgreSQL is found or started (`find_or_start_postgres`) and a Tansu broker is
    started, both with their files under `.work/`, and stopped again at the end.
Every step runs even when an earlier one failed; the exit code is non-zero when any failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.infra.testenv import (  # noqa: E402
    TEST_DATABASE_URL_ENV,
    TEST_KAFKA_BOOTSTRAP_ENV,
    docker_engine_available,
)

WORKDIR = ROOT / ".work"
MYPY_TARGETS = ("services", "tests", "bench", "scripts", "bootstrap.py", "migrations", "examples")
PYTEST_NO_TESTS_COLLECTED = 5
NGINX_FALLBACK = "/usr/sbin/nginx"  # not on a non-root user's PATH on Debian
CADDY_FALLBACK = "/usr/bin/caddy"
#: Set once this run's `apt-get update` succeeded: the installs after the first skip it.
_apt_lists_updated = False
PROMTOOL_FALLBACK = "/usr/bin/promtool"
PROMETHEUS_PIDFILE = Path("/run/prometheus/prometheus.pid")  # the package's init script's


def header(text: str) -> None:
    line = "=" * max(20, 78 - len(text) - 4)
    print(f"\n=== {text} {line}", flush=True)


def run_step(args: list[str]) -> int:
    """Run one tool in the foreground and return its exit code."""
    process = subprocess.Popen(args, cwd=ROOT)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # The child got the terminal's SIGINT too: give it a moment to print its own report.
        _reap(process, grace=5.0)
        raise
    except BaseException:
        _reap(process, grace=0.0)
        raise


def _reap(process: subprocess.Popen[bytes], grace: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def infrastructure() -> Iterator[None]:
    """Provide the two QUOTA_TEST_* variables to pytest, starting what is missing."""
    wanted = (TEST_DATABASE_URL_ENV, TEST_KAFKA_BOOTSTRAP_ENV)
    missing = [name for name in wanted if not os.environ.get(name)]
    if not missing:
        print(f"using {TEST_DATABASE_URL_ENV} and {TEST_KAFKA_BOOTSTRAP_ENV} from the environment")
        yield
        return
    if docker_engine_available():
        print("a Docker engine answers: the pytest fixtures will start testcontainers")
        yield
        return

    from services.infra.broker import TansuBroker
    from services.infra.postgres import find_or_start_postgres

    with contextlib.ExitStack() as stack:
        if TEST_DATABASE_URL_ENV in missing:
            started = time.monotonic()
            handle = find_or_start_postgres(WORKDIR)
            stack.callback(handle.stop)
            os.environ[TEST_DATABASE_URL_ENV] = handle.url
            print(
                f"postgres ({handle.kind}, {time.monotonic() - started:.1f}s): "
                f"{TEST_DATABASE_URL_ENV}={handle.url}"
            )
        if TEST_KAFKA_BOOTSTRAP_ENV in missing:
            started = time.monotonic()
            broker = stack.enter_context(TansuBroker(WORKDIR))
            os.environ[TEST_KAFKA_BOOTSTRAP_ENV] = broker.bootstrap
            log = broker.log_path.relative_to(ROOT)
            print(
                f"tansu ({time.monotonic() - started:.1f}s, log {log}): "
                f"{TEST_KAFKA_BOOTSTRAP_ENV}={broker.bootstrap}"
            )
        try:
            yield
        finally:
            print("stopping the local infrastructure", flush=True)


def apt_install(packages: tuple[str, ...], consequence: str, timeout: float = 900) -> None:
    """Install Debian packages a test needs, quietly, printing one line.

    Only as root with apt-get; otherwise, or when the install fails, print a warning and go on
    (`consequence`: the test that then fails, saying what is missing).
    """
    global _apt_lists_updated
    names = " and ".join(packages)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"warning: {names} missing and only root with apt-get installs it; {consequence}")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    for args in [install] if _apt_lists_updated else [["apt-get", "update", "-qq"], install]:
        command = " ".join(args)
        try:
            done = subprocess.run(
                args, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"warning: `{command}` failed ({exc}); {consequence}")
            return
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"warning: `{command}` exited {done.returncode} ({last}); {consequence}")
            return
        _apt_lists_updated = True
    print(f"installed Debian's {names} ({time.monotonic() - started:.1f}s)")


def ensure_nginx() -> None:
    """tests/deploy/test_nginx.py runs deploy/nginx/ with Debian's nginx. Debian 12's `nginx`
    package holds the binary with the auth_request module (`nginx-light` only adds the echo
    module to it)."""
    if not (shutil.which("nginx") or Path(NGINX_FALLBACK).exists()):
        apt_install(("nginx",), "tests/deploy/test_nginx.py will fail")


def ensure_caddy() -> None:
    """tests/deploy/test_caddy.py runs deploy/caddy/ with Debian's caddy (2.6 in bookworm, the
    binary at /usr/bin/caddy). The package has only systemd units: under systemd its postinst
    starts caddy.service on port 80, which the test does not want (it runs its own)."""
    if shutil.which("caddy") or Path(CADDY_FALLBACK).exists():
        return
    apt_install(("caddy",), "tests/deploy/test_caddy.py will fail")
    if Path("/run/systemd/system").exists():
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["systemctl", "stop", "caddy"], capture_output=True, timeout=60, check=False
            )


def ensure_chromium() -> None:
    """tests/ledger/test_ui.py drives the admin page in Debian's headless Chromium through
    chromedriver."""
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        apt_install(("chromium", "chromium-driver"), "tests/ledger/test_ui.py will fail")


def ensure_promtool() -> None:
    """tests/deploy/test_observability.py runs promtool on deploy/prometheus/; Debian's
    `prometheus` package holds it. Its postinst starts the server unless policy-rc.d forbids
    it (this project's containers have one that does): only promtool is wanted, so a server
    the install started is stopped again, through its own pidfile (or systemd unit)."""
    if shutil.which("promtool") or Path(PROMTOOL_FALLBACK).exists():
        return
    apt_install(("prometheus",), "tests/deploy/test_observability.py will fail")
    if Path("/run/systemd/system").exists():
        stop = ["systemctl", "stop", "prometheus"]
    elif PROMETHEUS_PIDFILE.exists():
        stop = ["/etc/init.d/prometheus", "stop"]
    else:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(stop, capture_output=True, timeout=60, check=False)
        print("stopped the prometheus server that its package started")


def _has_python(path: Path) -> bool:
    """mypy refuses (exit 2) a directory argument holding no .py files: skip those."""
    if path.is_file():
        return path.suffix == ".py"
    return path.is_dir() and any(path.rglob("*.py"))


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(pytest_args: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    python = sys.executable
    mypy_targets = [t for t in MYPY_TARGETS if _has_python(ROOT / t)]
    results: list[tuple[str, int, float]] = []

    def step(name: str, args: list[str], ok_codes: tuple[int, ...] = (0,)) -> None:
        header(name)
        started = time.monotonic()
        code = run_step(args)
        failed = code not in ok_codes
        results.append((name, code if failed else 0, time.monotonic() - started))

    try:
        step("ruff check .", [python, "-m", "ruff", "check", "."])
        step("ruff format --check .", [python, "-m", "ruff", "format", "--check", "."])
        step(f"mypy {' '.join(mypy_targets)}", [python, "-m", "mypy", *mypy_targets])
        header("infrastructure")
        ensure_nginx()
        ensure_caddy()
        ensure_promtool()
        ensure_chromium()
        with contextlib.ExitStack() as stack:
            started = time.monotonic()
            try:
                stack.enter_context(infrastructure())
            except Exception as exc:
                print(f"cannot provide the test infrastructure: {exc}", file=sys.stderr)
                results.append(("infrastructure", 1, time.monotonic() - started))
            else:
                name = " ".join(["pytest", *pytest_args])
                step(name, [python, "-m", "pytest", *pytest_args])
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    header("summary")
    for name, code, seconds in results:
        verdict = "ok" if code == 0 else f"FAILED (exit code {code})"
        if name.startswith("pytest") and code == PYTEST_NO_TESTS_COLLECTED:
            verdict += ": no tests collected"
        print(f"  {verdict:<34} {seconds:6.1f}s  {name}")
    failed = [name for name, code, _ in results if code != 0]
    print("all steps passed" if not failed else f"{len(failed)} step(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
