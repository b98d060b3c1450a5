# syntax=docker/dockerfile:1
#
# Production image for the quota service: `docker run IMAGE ledger|policy|migrate ...`.
# Build:  docker build -t quota-service .
# The build stage installs the project (runtime dependencies only, no dev extras) into a
# virtualenv; the runtime stage copies just that virtualenv, so no source tree or build
# tooling ends up in the final image.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
COPY . /src
RUN pip install --upgrade pip \
 && pip install .


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
