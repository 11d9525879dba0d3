# One image for every role: producer (HTTP), worker, telemetry.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY turnfleet turnfleet
COPY producer producer
COPY workers workers
COPY telemetry telemetry
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 turnfleet
USER turnfleet
ENV TURNFLEET_LOG_FORMAT=json
ENTRYPOINT ["turnfleet"]
CMD ["--help"]
