"""Deployment artefacts: compose.yaml against the Compose spec, its shape, and the Dockerfile.

Everything here runs offline: the Compose specification schema is the copy vendored inside
check-jsonschema (`--builtin-schema vendor.compose-spec`), and the validator runs with the
HTTP(S) proxies pointed at a closed local port so that any attempt to reach the network would
fail the test instead of silently succeeding on a connected machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "lock.txt"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"

# The configuration an operator is told about; anything else named QUOTA_* is a typo or an
# undocumented knob.
DOCUMENTED_QUOTA_VARS = frozenset(
    {
        "QUOTA_DATABASE_URL",
        "QUOTA_KAFKA_BOOTSTRAP",
        "QUOTA_TOPIC",
        "QUOTA_ADMIN_TOKEN",
        "QUOTA_SERVICE_TOKEN",
        "QUOTA_REDIS_URL",
    }
)
SECRETS = ("QUOTA_ADMIN_TOKEN", "QUOTA_SERVICE_TOKEN")
QUOTA_SERVICES = ("migrate", "ledger", "policy")

# Any network access by the validator goes to a closed port and fails.
_OFFLINE_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


# --------------------------------------------------------------------------- helpers


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    """Run check-jsonschema with its vendored Compose specification on `path`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **_OFFLINE_ENV},
    )


def _load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _load_compose().get("services")
    assert isinstance(services, dict) and services, "compose.yaml defines no services"
    return services


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two Compose forms it uses."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    assert isinstance(raw, dict)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def _argv(value: object) -> list[str]:
    """A `command`/`entrypoint`/healthcheck value as an argv list."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list)
    return [str(item) for item in value]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name -> condition (short list form means service_started)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {str(name): "service_started" for name in raw}
    assert isinstance(raw, dict)
    return {str(name): str((spec or {}).get("condition", "")) for name, spec in raw.items()}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _pip_installs() -> list[list[str]]:
    """The argv after `pip install` of every pip install in the Dockerfile's RUN steps, in order."""
    installs: list[list[str]] = []
    for keyword, args in _dockerfile_instructions():
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            argv = shlex.split(command)
            for start in range(len(argv) - 1):
                if argv[start].endswith("pip") and argv[start + 1] == "install":
                    installs.append(argv[start + 2 :])
                    break
    return installs


def _locked(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """A hashed pip-compile lock as canonical name -> (pinned version, its hashes)."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for entry in re.split(r"\n(?=\S)", path.read_text(encoding="utf-8")):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", entry)
        if match:
            hashes = frozenset(re.findall(r"--hash=(sha256:[0-9a-f]{64})", entry))
            pins[canonicalize_name(match[1])] = (match[2], hashes)
    return pins


def _stage_instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction in the Dockerfile's final stage."""
    final: list[tuple[str, str]] = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "FROM":
            final = []
        final.append((keyword, args))
    return [args for keyword, args in final if keyword == name]


# ------------------------------------------------------------ (a) Compose specification


def test_compose_file_matches_compose_specification() -> None:
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "bad-types",
            "services:\n  x:\n    image: 5\n    ports: nope\n",
            ["$.services.x.image", "$.services.x.ports"],
        ),
        (
            "unknown-top-level-key",
            "services:\n  x:\n    image: busybox\nbogus: 1\n",
            ["bogus"],
        ),
        (
            "bad-depends-on-condition",
            "services:\n  x:\n    image: busybox\n    depends_on:\n"
            "      y:\n        condition: service_done\n  y:\n    image: busybox\n",
            ["$.services.x.depends_on"],
        ),
    ],
)
def test_broken_compose_file_fails_validation(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    broken = tmp_path / f"{name}.yaml"
    broken.write_text(text, encoding="utf-8")
    result = _validate(broken)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Schema validation errors" in output
    for fragment in expected:
        assert fragment in output, output


# ------------------------------------------------------------ (b) what operators rely on


def test_compose_has_no_obsolete_version_key() -> None:
    assert "version" not in _load_compose()


def test_kafka_is_apache_image_in_kraft_combined_mode() -> None:
    services = _services()
    kafka = services["kafka"]
    image = str(kafka["image"])
    assert image == "apache/kafka" or image.startswith("apache/kafka:"), image
    env = _env(kafka)
    roles = {role.strip() for role in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert {"broker", "controller"} <= roles
    for key in (
        "KAFKA_NODE_ID",
        "KAFKA_LISTENERS",
        "KAFKA_ADVERTISED_LISTENERS",
        "KAFKA_CONTROLLER_LISTENER_NAMES",
        "KAFKA_CONTROLLER_QUORUM_VOTERS",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
        "KAFKA_INTER_BROKER_LISTENER_NAME",
    ):
        assert env.get(key), f"kafka needs {key}"
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@")
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    ):
        assert env.get(key) == "1", f"{key} must be 1 on a single node"
    assert env.get("KAFKA_NUM_PARTITIONS") == "4"
    # The services reach the broker on the listener it advertises.
    bootstrap = _env(services["ledger"])["QUOTA_KAFKA_BOOTSTRAP"]
    assert bootstrap in env["KAFKA_ADVERTISED_LISTENERS"]
    healthcheck = " ".join(_argv(kafka["healthcheck"]["test"]))
    assert re.search(r"/opt/kafka/bin/kafka-(broker-api-versions|topics)\.sh", healthcheck)


def test_no_zookeeper_anywhere() -> None:
    for name, service in _services().items():
        assert "zookeeper" not in name.lower()
        assert "zookeeper" not in str(service.get("image", "")).lower()
        for key, value in _env(service).items():
            assert "ZOOKEEPER" not in key.upper(), f"{name}: {key}"
            assert "zookeeper" not in value.lower(), f"{name}: {key}={value}"


def test_postgres_and_redis() -> None:
    compose = _load_compose()
    services = _services()
    postgres = services["postgres"]
    assert str(postgres["image"]).split(":")[:2] == ["postgres", "16"]
    named_volumes = set((compose.get("volumes") or {}).keys())
    sources = {str(v).split(":")[0] for v in postgres.get("volumes", []) if isinstance(v, str)}
    assert sources & named_volumes, "postgres data must live on a named volume"
    assert "pg_isready" in " ".join(_argv(postgres["healthcheck"]["test"]))
    assert str(services["redis"]["image"]).split(":")[:2] == ["redis", "7"]


@pytest.mark.parametrize(("name", "port"), [("ledger", 8080), ("policy", 8081)])
def test_quota_services_run_the_right_subcommand(name: str, port: int) -> None:
    service = _services()[name]
    # The image's ENTRYPOINT is `quota`; the service must not override it.
    entrypoint = _argv(service.get("entrypoint"))
    command = _argv(service.get("command"))
    argv = (entrypoint or ["quota"]) + command
    assert argv[:2] == ["quota", name], argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == str(port)
    published = [str(p) for p in service.get("ports", [])]
    assert any(p.endswith(f":{port}") or p == str(port) for p in published), published
    healthcheck = " ".join(_argv(service["healthcheck"]["test"]))
    assert f":{port}/readyz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck  # absent in slim images


def test_migrate_runs_quota_migrate_after_postgres() -> None:
    migrate = _services()["migrate"]
    argv = (_argv(migrate.get("entrypoint")) or ["quota"]) + _argv(migrate.get("command"))
    assert argv[:2] == ["quota", "migrate"], argv
    assert _depends_on(migrate).get("postgres") == "service_healthy"


def test_quota_services_are_built_from_this_repository() -> None:
    for name in QUOTA_SERVICES:
        build = _services()[name].get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context in (".", "./"), f"{name} must build the image from this repository"


def test_startup_order() -> None:
    services = _services()
    ledger = _depends_on(services["ledger"])
    policy = _depends_on(services["policy"])
    assert ledger.get("migrate") == "service_completed_successfully"
    assert ledger.get("kafka") == "service_healthy"
    assert policy.get("migrate") == "service_completed_successfully"
    assert "ledger" in policy


def test_quota_variables_are_documented_settings() -> None:
    compose = _load_compose()
    used: set[str] = set()
    for service in _services().values():
        used |= {key for key in _env(service) if key.startswith("QUOTA_")}
    shared = compose.get("x-quota-env")
    assert isinstance(shared, dict), "shared environment must be the x-quota-env extension"
    used |= {str(key) for key in shared if str(key).startswith("QUOTA_")}
    # Interpolations too: `${QUOTA_X}`, `${QUOTA_X:?...}`, `$QUOTA_X`.
    used |= set(re.findall(r"\$\{?(QUOTA_[A-Z0-9_]+)", COMPOSE.read_text(encoding="utf-8")))
    assert used, "no QUOTA_ variables found"
    assert used <= DOCUMENTED_QUOTA_VARS, sorted(used - DOCUMENTED_QUOTA_VARS)
    fields = set(Settings.model_fields)
    for var in used:
        assert var.removeprefix("QUOTA_").lower() in fields, f"{var} is not a Settings field"
    assert "QUOTA_REDIS_URL" in _env(_services()["policy"])


def test_quota_services_share_the_extension_environment() -> None:
    shared = {str(k): str(v) for k, v in _load_compose()["x-quota-env"].items()}
    for name in QUOTA_SERVICES:
        env = _env(_services()[name])
        missing = {k for k, v in shared.items() if env.get(k) != v}
        assert not missing, f"{name} lacks shared settings {sorted(missing)}"
        assert env["QUOTA_DATABASE_URL"].startswith("postgresql://")


def test_secrets_come_from_the_operator_environment() -> None:
    for name in QUOTA_SERVICES:
        env = _env(_services()[name])
        for secret in SECRETS:
            # `${VAR:?message}`: Compose refuses to start when the operator has not set it.
            assert re.fullmatch(rf"\$\{{{secret}:\?[^}}]+\}}", env[secret]), (name, env[secret])


# --------------------------------------------------------------------- (c) Dockerfile


def test_dockerfile_entrypoint_is_quota() -> None:
    entrypoints = _stage_instructions("ENTRYPOINT")
    assert entrypoints, "Dockerfile's final stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["quota"]


def test_dockerfile_base_user_and_install() -> None:
    froms = [args for keyword, args in _dockerfile_instructions() if keyword == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    users = _stage_instructions("USER")
    assert users, "the runtime image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(args for keyword, args in _dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "project must be pip-installed"
    assert "[dev]" not in runs


def test_dockerfile_installs_from_the_hashed_runtime_lock() -> None:
    installs = _pip_installs()
    locked = [argv for argv in installs if "--require-hashes" in argv]
    assert locked, "the image must install its dependencies with --require-hashes"
    assert any(
        argv[argv.index(flag) + 1] == "requirements/runtime.txt"
        for argv in locked
        for flag in ("-r", "--requirement")
        if flag in argv[:-1]
    ), locked
    # Everything else is the project itself, without resolving anything: no unpinned
    # `pip install --upgrade pip`, no `pip install .` pulling in ranges.
    for argv in installs:
        assert argv in locked or "--no-deps" in argv, argv
    project = [i for i, argv in enumerate(installs) if "." in argv]
    assert project and "--no-deps" in installs[project[-1]], installs
    assert installs.index(locked[0]) < project[-1], "dependencies go in before the project"


def test_runtime_lock_is_the_runtime_part_of_the_lock() -> None:
    """requirements/runtime.txt: every runtime dependency and pip, pinned and hashed exactly as in
    requirements/lock.txt (what CI tests), and none of the dev extra."""
    runtime, full = _locked(RUNTIME_LOCK), _locked(LOCK)
    for name, (version, hashes) in runtime.items():
        assert hashes, f"{name} has no hashes in {RUNTIME_LOCK.name}"
        assert full.get(name) == (version, hashes), f"{name}=={version} differs from {LOCK.name}"
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    wanted = {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}
    missing = (wanted | {"pip"}) - runtime.keys()
    assert not missing, f"run `python3 bootstrap.py lock`: {sorted(missing)} not locked"
    dev = {
        canonicalize_name(Requirement(spec).name)
        for spec in project["optional-dependencies"]["dev"]
    }
    assert not dev & runtime.keys(), sorted(dev & runtime.keys())


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".work", ".git"} <= entries
