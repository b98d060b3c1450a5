"""How the test suite finds its infrastructure: environment variables and Docker detection."""

from __future__ import annotations

import functools
import shutil
import subprocess

#: A plain `postgresql://` URL of a server on which the tests may create databases.
TEST_DATABASE_URL_ENV = "QUOTA_TEST_DATABASE_URL"
#: `host:port` of a Kafka-protocol broker the tests may create topics on.
TEST_KAFKA_BOOTSTRAP_ENV = "QUOTA_TEST_KAFKA_BOOTSTRAP"


@functools.cache
def docker_engine_available(timeout: float = 10.0) -> bool:
    """True when `docker info` succeeds, i.e. a Docker engine answers (testcontainers can run)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run(
            [docker, "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0
