"""Settings, one pydantic-settings class per process kind, all read from ``TURNFLEET_*``.

``REDIS_URL`` (or ``TURNFLEET_REDIS_URL``) points every process at a Redis server; without it
the CLI starts the embedded one. Nothing else in the code reads ``os.environ`` for
configuration.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from turnfleet.models import check_pseudonymous_id
from turnfleet.redaction import Redactor


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TURNFLEET_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "TURNFLEET_REDIS_URL"),
        description="Redis server for every process; unset: the CLI starts the embedded one.",
    )
    state_dir: Path = Field(
        default=Path(".turnfleet"),
        description="Where the embedded Redis keeps its data (AOF) and its pid/port file.",
    )
    trace_redis_url: str | None = Field(
        default=None, description="Redis for the trace store (bulky span payloads); unset: REDIS_URL."
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0,
        description="How long a --burst worker or telemetry consumer waits for Redis to answer "
                    "(at start or after losing it) before it gives up with exit status 1.",
    )
    budgets: dict[str, float] = Field(
        default_factory=dict,
        description='Daily spend limit in USD per customer (JSON), e.g. {"C-100": 5}.',
    )
    default_daily_budget_usd: float | None = Field(
        default=None, description="Daily limit for customers not in TURNFLEET_BUDGETS; unset: none."
    )
    log_format: str = Field(default="console", description="'console' or 'json'.")
    log_level: str = Field(default="INFO")
    redact_patterns: list[str] = Field(
        default_factory=list,
        description="Extra regexes to redact (JSON list); a named group (?P<kind>...) names the kind.",
    )
    redact_fields: list[str] = Field(
        default_factory=list,
        description="Field names whose values are always redacted (JSON list), e.g. [\"ssn\"].",
    )
    redact_detectors: list[str] = Field(
        default_factory=list,
        description='Extra detectors (JSON list of "module:callable"); each callable returns '
        "turnfleet.redaction.Detector objects, run after the built-in ones.",
    )


class ApiKey(BaseModel):
    """One API key, stored as the SHA-256 hex digest of the key (never the key itself)."""

    name: str
    sha256: str
    customers: list[str] = Field(description='Customer ids this key may use; ["*"]: all (operator).')
    unredacted: bool = Field(default=False, description="May read turns' text as written "
                             "(?unredacted=true on the replay and turn routes); each such read is audited.")

    @field_validator("customers")
    @classmethod
    def _pseudonymous(cls, customers: list[str]) -> list[str]:
        """A key for a customer id no request may carry (an e-mail address...) is refused."""

        for i, customer in enumerate(customers):
            if customer != "*":
                try:
                    check_pseudonymous_id(customer)
                except ValueError as exc:
                    raise ValueError(f"customer {i + 1}: {exc}") from None
        return customers


class ProducerSettings(CommonSettings):
    max_text_chars: int = Field(default=8000, description="Longest user text accepted.")
    max_feedback_comment_chars: int = Field(default=2000, description="Longest feedback comment accepted.")
    max_metadata_items: int = Field(default=32)
    max_metadata_bytes: int = Field(default=4096, description="Keys plus values, UTF-8.")
    max_bulk: int = Field(default=10_000, description="Most turns in one bulk enqueue.")

    http_host: str = Field(default="127.0.0.1", description="Where `turnfleet serve` listens.")
    http_port: int = Field(default=8080)
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description='JSON list of {"name", "sha256", "customers"}; `turnfleet apikey new` makes one.',
    )
    api_keys_file: Path | None = Field(
        default=None, description="JSON file with the same list; re-read when it changes."
    )
    api_keys_reload_s: float = Field(
        default=5.0, description="How often the keys file is checked for changes (also on SIGHUP)."
    )
    max_body_bytes: int = Field(default=1_048_576, description="Larger request bodies get 413.")
    max_batch: int = Field(default=100, description="Most turns in one POST /v1/turns:batch.")
    max_wait_s: float = Field(default=60.0, description="Longest ?wait= a long-poll may ask for.")
    ready_worker_max_age_s: float = Field(
        default=15.0, description="/readyz wants a worker heartbeat at most this old."
    )
    ready_max_telemetry_lag: int = Field(
        default=10_000, description="/readyz wants at most this many telemetry entries not yet aggregated."
    )

    def limits(self) -> dict[str, int]:
        return {
            "max_text_chars": self.max_text_chars,
            "max_metadata_items": self.max_metadata_items,
            "max_metadata_bytes": self.max_metadata_bytes,
        }


class WorkerProcessSettings(CommonSettings):
    # arq: measured (DESIGN.md) 0.01 s poll and 10+ concurrent jobs give ~230 turns/s a
    # process on the offline model; arq's 0.5 s poll gives ~50 and a bimodal pickup latency.
    # Real model calls are I/O-bound, hence room for 50 turns in flight.
    poll_delay_s: float = Field(default=0.01, description="arq queue poll interval.")
    max_jobs: int = Field(default=50, description="Turns in flight per worker process.")
    check_jobs: int = Field(
        default=100, ge=1,
        description="Check jobs (a finished turn's checks) in flight per worker process, in a lane of "
        "their own: they never take a turn's slot. One poll of the lane takes up to this many as one "
        "batch (workers/checks_lane.py).",
    )
    turn_timeout_s: float = Field(default=120.0, description="One attempt of a turn, at most.")
    max_attempts: int = Field(default=3, description="Attempts before a turn ends 'failed'.")
    retry_delay_s: float = Field(default=0.5, description="Delay before attempt n+1 (× n).")
    max_agent_turns: int = Field(default=10, description="SDK max_turns per run.")
    session_ttl_s: int | None = Field(
        default=None, description="Expiry of conversation memory; unset keeps it."
    )

    model_name: str = Field(
        default="turnfleet-offline",
        description="Model name; 'turnfleet-offline' is the embedded deterministic model "
        "('turnfleet-offline-flawed': the same with a planted wrong-order refund).",
    )
    model_base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint; unset uses the offline model."
    )
    model_api_key: str | None = Field(default=None)
    model_api: str = Field(default="chat", description="'chat' (Chat Completions) or 'responses'.")
    model_timeout_s: float = Field(default=30.0, description="One model request, at most.")
    model_max_retries: int = Field(
        default=3, description="Retries of a model request on 429, 5xx, timeouts, with backoff."
    )
    model_http: str = Field(
        default="aiohttp",
        description="The openai client's HTTP transport: 'aiohttp' (its aiohttp transport: ~0.5 ms "
        "less CPU a model call, BENCHMARKS.md table 2b) or 'httpx' (its default).",
    )
    turn_lease_s: float = Field(
        default=10.0,
        description="A running turn's lease, renewed while it runs: a killed worker's turn is "
        "picked up again after at most this long.",
    )
    isolated_losses: int = Field(
        default=1, ge=1,
        description="A turn that loses its worker this many times while it runs alone (the isolated "
        "lane) ends 'failed' with WorkerLost. Losses beside other turns are not charged.",
    )
    drain_grace_s: float = Field(
        default=30.0, description="On SIGTERM, how long running turns may finish before they are requeued."
    )
    reconcile_every_s: float = Field(
        default=30.0, description="How often a worker looks for conversations left without a job."
    )

    app: str | None = Field(
        default=None,
        description="The workflows this worker serves, as module:attribute (a turnfleet Workflow, a "
        "list of them, or an App), like `uvicorn module:app`; unset: the built-in Support Desk.",
    )
    workflow_name: str = Field(default="Support Desk", description="Trace workflow name.")
    tracing_disabled: bool = Field(default=False)
    trace_include_sensitive_data: bool = Field(default=True)
    trace_sample_rate: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="Share of conversations whose spans are stored (stable per conversation).",
    )
    trace_keep_slower_than_ms: float | None = Field(
        default=10_000.0, description="Turns slower than this keep their spans whatever the rate."
    )
    trace_retention_s: int = Field(default=7 * 86400, description="How long stored traces live.")
    trace_buffer_spans: int = Field(
        default=20_000, description="Spans buffered per process before new ones are dropped."
    )
    openai_trace_export: bool = Field(
        default=False,
        description="Also send traces to OpenAI's dashboard with the SDK's own exporter "
        "(needs OPENAI_API_KEY; unsampled and unredacted).",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint (e.g. http://localhost:4318/v1/traces); needs turnfleet[otlp].",
    )
    otlp_headers: dict[str, str] = Field(default_factory=dict, description="Headers for OTLP (JSON).")
    worker_name: str | None = Field(default=None, description="Defaults to host:pid.")
    order_book: Path | None = Field(
        default=None,
        description="The Support Desk's order book (a JSON file like workers/data/orders.json); "
        "unset: the packaged one.",
    )


class Price(BaseModel):
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


DEFAULT_PRICES: dict[str, Price] = {
    # Published list prices per 1M tokens; check your provider's current page and override
    # with TURNFLEET_PRICES='{"model": {"input": ..., "cached_input": ..., "output": ...}}'.
    "gpt-4o": Price(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4o-mini": Price(input=0.15, cached_input=0.075, output=0.60),
    "gpt-4.1": Price(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini": Price(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano": Price(input=0.10, cached_input=0.025, output=0.40),
    "o4-mini": Price(input=1.10, cached_input=0.275, output=4.40),
    "gpt-5": Price(input=1.25, cached_input=0.125, output=10.00),
    "gpt-5-mini": Price(input=0.25, cached_input=0.025, output=2.00),
    "gpt-5-nano": Price(input=0.05, cached_input=0.005, output=0.40),
    # Other providers by their own model names (a "litellm/anthropic/<name>" call is priced
    # by "<name>"); cached_input is the cache-read price.
    "claude-3-5-sonnet-20240620": Price(input=3.00, cached_input=0.30, output=15.00),
    "claude-3-5-haiku-20241022": Price(input=0.80, cached_input=0.08, output=4.00),
    "claude-sonnet-4-20250514": Price(input=3.00, cached_input=0.30, output=15.00),
    # The offline model is priced as if it were gpt-4.1-mini, so cost figures are realistic.
    "turnfleet-offline": Price(input=0.40, cached_input=0.10, output=1.60),
    "turnfleet-offline-flawed": Price(input=0.40, cached_input=0.10, output=1.60),
}


class TelemetrySettings(CommonSettings):
    consumer_name: str | None = Field(default=None, description="Defaults to host:pid.")
    batch_size: int = Field(default=100, description="Stream entries read per XREADGROUP.")
    block_ms: int = Field(default=1000)
    claim_idle_ms: int = Field(
        default=30_000, description="Take over entries another consumer left pending this long."
    )
    seen_ttl_s: int = Field(
        default=7 * 86400, description="How long event ids are remembered for de-duplication."
    )
    retention_s: int | None = Field(
        default=None, ge=60,
        description="Purge finished conversations idle this long (turns, traces, memory, "
        "aggregates, index entries); unset keeps everything. At least seen_ttl_s.",
    )
    raw_retention_s: int = Field(
        default=7 * 86400, ge=0,
        description="How long raw customer text (turn requests and answers, tool output in "
        "results, attempt error messages, escalation tickets, conversation memory) is kept after "
        "its turn finished; then only the redacted form stays. 0: kept as long as the turn.",
    )
    prices: dict[str, Price] = Field(default_factory=dict, description="Added to the defaults.")

    alert_conversation_cost_usd: float = Field(default=0.50)
    alert_customer_daily_cost_usd: float = Field(default=20.0)
    alert_turn_failed: bool = Field(default=True, description="Alert on every failed turn.")
    alert_error_rate: float = Field(default=0.20, description="Failed/finished turns in a window.")
    alert_error_rate_window_s: int = Field(default=300)
    alert_error_rate_min_turns: int = Field(default=10)
    alert_feedback_negative_rate: float = Field(
        default=0.20, description="Negative feedback / finished turns in an error-rate window.")
    alert_feedback_negative_min_count: int = Field(
        default=5, description="Negative feedback in the window before that rate alerts.")
    alert_check_failure_rate: float = Field(
        default=0.20, description="Failed / judged results of one check of one workflow in an error-rate window.")
    alert_check_failure_min_count: int = Field(
        default=5, description="Failures of that check in the window before that rate alerts.")
    alert_webhook_url: str | None = Field(
        default=None, description="POST every alert here (at least once); unset: no webhook."
    )
    alert_webhook_timeout_s: float = Field(default=5.0)
    alert_webhook_max_backoff_s: float = Field(default=60.0, description="Longest wait between retries.")
    dead_letter_after: int = Field(
        default=5, description="Deliveries after which a telemetry entry goes to the dead-letter stream."
    )
    telemetry_max_entries: int = Field(
        default=1_000_000,
        description="Acknowledged entries are trimmed; an unacknowledged backlog longer than this "
        "is counted and logged (never trimmed).",
    )
    latency_samples: int = Field(
        default=10_000, description="Latest samples kept per dimension for p50/p95/p99."
    )

    @model_validator(mode="after")
    def _retention_outlives_dedupe(self) -> TelemetrySettings:
        # A telemetry entry redelivered after its turn's dedupe set was purged would count twice.
        if self.retention_s is not None and self.retention_s < self.seen_ttl_s:
            raise ValueError(f"retention_s ({self.retention_s}) must be at least seen_ttl_s "
                             f"({self.seen_ttl_s}): set TURNFLEET_SEEN_TTL_S too")
        return self

    def price_table(self) -> dict[str, Price]:
        return {**DEFAULT_PRICES, **self.prices}


@functools.lru_cache(maxsize=1)
def default_redactor() -> Redactor:
    """The redactor for this process's ``TURNFLEET_REDACT_*`` settings, built once."""
    return Redactor.from_settings(CommonSettings())
