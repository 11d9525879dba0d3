# One image for every role; the compose service's command picks it:
#   producer  -> turnfleet serve --host 0.0.0.0 --port 8080   (the HTTP API)
#   worker    -> turnfleet worker                             (scale: --scale worker=N)
#   telemetry -> turnfleet telemetry
# and every role is configured by the same TURNFLEET_* variables (README, "Settings").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first, pinned by constraints.txt, in their own layer: a code change does not
# reinstall them. Empty packages stand in for the code so setuptools can resolve the project.
COPY pyproject.toml constraints.txt ./
RUN mkdir turnfleet producer workers telemetry shell \
    && touch turnfleet/__init__.py producer/__init__.py workers/__init__.py telemetry/__init__.py shell/__init__.py \
    && pip install -c constraints.txt '.[otlp]' \
    && pip uninstall -y turnfleet \
    && rm -rf turnfleet producer workers telemetry shell build *.egg-info

# The code. --no-deps: everything it needs is in the layer above, at the pinned versions.
COPY turnfleet turnfleet
COPY producer producer
COPY workers workers
COPY telemetry telemetry
COPY shell shell
RUN pip install --no-deps -c constraints.txt '.[otlp]' \
    && pip check \
    && rm -rf build *.egg-info \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin turnfleet

# Not root. The code is read-only to the process; the state folder (alert follower cursors;
# the embedded Redis is never used here, REDIS_URL is always set) lives under /tmp.
USER turnfleet
ENV TURNFLEET_STATE_DIR=/tmp/turnfleet \
    TURNFLEET_LOG_FORMAT=json \
    TURNFLEET_HTTP_HOST=0.0.0.0 \
    TURNFLEET_HTTP_PORT=8080

EXPOSE 8080
# No HEALTHCHECK here: it depends on the role; compose sets `turnfleet health --role ...`.
ENTRYPOINT ["turnfleet"]
CMD ["--help"]
