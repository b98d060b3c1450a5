# syntax=docker/dockerfile:1
#
# Production image for the quota service: `docker run IMAGE ledger|policy|migrate ...`.
# Build:  docker build -t quota-service .
# The build stage installs into a virtualenv, first pip and the runtime dependencies (no dev
# extras) exactly as requirements/runtime.txt pins them, each checked against its SHA-256
# hashes, then the project itself with --no-deps, so no dependency is resolved at build time
# (only the build backend, setuptools>=69, is fetched to build the project's wheel). The
# runtime stage copies just that virtualenv, so no source tree or build tooling ends up in the
# final image. `python3 bootstrap.py lock` refreshes requirements/runtime.txt together with
# requirements/lock.txt (the same pins, what CI tests).

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# The lock alone first, so a source change does not re-download the dependencies.
COPY requirements/runtime.txt /src/requirements/runtime.txt
RUN pip install --require-hashes -r requirements/runtime.txt
COPY . /src
RUN pip install --no-deps .


FROM python:3.11-slim AS runtime

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid 10001 quota \
 && useradd --system --uid 10001 --gid quota --home-dir /home/quota --create-home \
        --shell /usr/sbin/nologin quota

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/quota

# ledger (8080) and policy (8081); pass --port to change.
EXPOSE 8080 8081

ENTRYPOINT ["quota"]
CMD ["--help"]
