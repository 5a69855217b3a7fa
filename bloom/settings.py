"""Settings read once from the environment into a typed, immutable object (README, "Configuration")."""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _at_least(value: float, name: str, minimum: float, meaning: str) -> float:
    if value < minimum:
        raise ConfigError(f"{name} must be {meaning}, got {value:g}")
    return value


# The shortest interval or period a setting may give: a microsecond kept a process busy
# (71 % of a core), and `inf` passed as a number and killed the processes when a timer
# was armed with it (OverflowError).
MIN_SECONDS, MAX_SECONDS = 0.05, 10 * 365 * 86400.0


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A period or an interval: finite, from MIN_SECONDS to ten years."""
    value = _float(env, name, default)
    if not MIN_SECONDS <= value <= MAX_SECONDS:  # NaN fails both
        raise ConfigError(f"{name} must be a number of seconds from {MIN_SECONDS:g} to {MAX_SECONDS:.0f}, got {value:g}")
    return value


def _count(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    return int(_at_least(_int(env, name, default), name, minimum, f"an integer of at least {minimum}"))


def _optional_count(env: Mapping[str, str], name: str) -> int | None:
    """A count of at least 1, or None when unset."""
    return _count(env, name, 1) if env.get(name, "").strip() else None


def _switch(env: Mapping[str, str], name: str) -> bool:
    """On unless set to off, 0 or false."""
    return env.get(name, "on").strip().lower() not in ("off", "0", "false")


LOOPBACK_PROXIES = ("127.0.0.1", "::1")
# Loopback and the private ranges; not link-local (169.254.0.0/16 holds cloud metadata).
DEFAULT_AGENT_NETWORKS = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


def _networks(env: Mapping[str, str], name: str, default: str) -> tuple:
    raw = env.get(name, "").strip() or default
    networks = []
    for part in (part.strip() for part in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not an address or CIDR") from None
    return tuple(networks)


def _trusted_proxies(env: Mapping[str, str]) -> tuple[tuple[str, ...], int]:
    """BLOOM_TRUSTED_PROXIES: a hop count (the proxy on this host: 127.0.0.1 and ::1), or
    a comma list of proxy addresses/CIDRs (hops then from BLOOM_PROXY_HOPS, default 1)."""
    raw = env.get("BLOOM_TRUSTED_PROXIES", "").strip() or "1"
    if raw.isdigit():
        return LOOPBACK_PROXIES, int(raw)
    networks = tuple(part.strip() for part in raw.split(",") if part.strip())
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"BLOOM_TRUSTED_PROXIES: {network!r} is not an address or CIDR") from None
    return networks, _int(env, "BLOOM_PROXY_HOPS", 1)


def _port(env: Mapping[str, str]) -> int:
    port = _int(env, "BLOOM_RUNTIME_PORT", 3002)
    if not 1 <= port <= 65535:
        raise ConfigError(f"BLOOM_RUNTIME_PORT must be a port from 1 to 65535, got {port}")
    return port


def normalize_database_url(url: str) -> str:
    """Accept the `postgres://` spelling other services use, and pin the psycopg2 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class MinioSettings:
    endpoint: str
    port: int
    access_key: str
    secret_key: str
    use_ssl: bool
    bucket: str


@dataclass(frozen=True)
class Settings:
    port: int
    database_url: str | None
    data_dir: str
    runtime_api_key: str | None
    membridge_server_url: str
    membridge_admin_key: str
    minio: MinioSettings | None
    ratelimit_storage_uri: str
    rate_limit: str
    test_connection_rate_limit: str
    # Peers whose X-Forwarded-* are believed, and how many proxy hops they add.
    trusted_proxy_networks: tuple[str, ...]
    proxy_hops: int
    production: bool
    max_body_bytes: int
    worker_sync_interval_s: float
    lease_sweep_interval_s: float
    run_scheduler: bool
    db_pool_size: int
    # Long polls that may wait at once in one process: gunicorn's threads less 8 kept for
    # short requests.
    max_waiting_claims: int
    db_connect_timeout_s: int
    db_statement_timeout_ms: int
    db_lock_timeout_ms: int
    retention_completed_s: int
    retention_failed_s: int
    retention_audit_s: int
    prune_interval_s: float
    # The address agents call back (runtime_url of a dispatched task): configuration
    # only, never a request's Host or X-Forwarded-Host. Unset: no dispatch.
    public_url: str | None
    metrics_key: str | None
    agent_key: str
    dispatch_enabled: bool
    worker_liveness_s: float
    # Who may do what (README "Security"): with an operator key, the runtime key is the
    # workers' and agents' credential only (register, claim, heartbeats, completions).
    operator_key: str | None
    # Bodies over 1 MiB handled at once per process (bloom/web/guards.py, LargeBodies).
    large_bodies_at_once: int
    # Where agent urls may point: the runtime sends the agent key and prompts there.
    agent_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # Running (leased or running) tasks one fairness key may have at once, unless a task's
    # policy.max_running_per_key says otherwise; None: no cap (README, "Fair shares").
    max_running_per_key: int | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        database_url = env.get("DATABASE_URL", "").strip() or None
        minio_endpoint = env.get("MINIO_ENDPOINT", "").strip()
        minio = None
        if minio_endpoint:
            minio = MinioSettings(
                endpoint=minio_endpoint,
                port=_int(env, "MINIO_PORT", 9000),
                access_key=env.get("MINIO_ACCESS_KEY", ""),
                secret_key=env.get("MINIO_SECRET_KEY", ""),
                use_ssl=env.get("MINIO_USE_SSL", "").strip().lower() == "true",
                bucket=env.get("MINIO_ARTIFACT_BUCKET", "").strip() or "bloom-artifacts",
            )
        deployment = (env.get("BLOOM_ENV") or env.get("NODE_ENV") or "").strip().lower()
        trusted_proxy_networks, proxy_hops = _trusted_proxies(env)
        if proxy_hops < 0:
            raise ConfigError(f"BLOOM_PROXY_HOPS must be 0 or more, got {proxy_hops}")
        return cls(
            port=_port(env),
            database_url=normalize_database_url(database_url) if database_url else None,
            data_dir=env.get("BLOOM_DATA_DIR", "").strip() or "./.bloom",
            runtime_api_key=env.get("RUNTIME_API_KEY") or None,
            membridge_server_url=(env.get("MEMBRIDGE_SERVER_URL", "").strip() or "http://127.0.0.1:8000").rstrip("/"),
            membridge_admin_key=env.get("MEMBRIDGE_ADMIN_KEY", ""),
            minio=minio,
            ratelimit_storage_uri=env.get("RATELIMIT_STORAGE_URI", "").strip() or "memory://",
            rate_limit=env.get("BLOOM_RATE_LIMIT", "").strip() or "100 per minute",
            test_connection_rate_limit=env.get("BLOOM_TEST_CONNECTION_RATE_LIMIT", "").strip() or "20 per minute",
            trusted_proxy_networks=trusted_proxy_networks,
            proxy_hops=proxy_hops,
            production=deployment == "production",
            max_body_bytes=_count(env, "BLOOM_MAX_BODY_BYTES", 16 * 1024 * 1024),
            worker_sync_interval_s=_seconds(env, "WORKER_SYNC_INTERVAL_S", 10.0),
            lease_sweep_interval_s=_seconds(env, "LEASE_SWEEP_INTERVAL_S", 30.0),
            run_scheduler=_switch(env, "BLOOM_SCHEDULER"),
            # Short requests hold a connection for a few ms, long-polling claims none while
            # they wait, so the pool is not sized by threads: 8, plus the scheduler's lock,
            # the queue listener and the dispatcher's leadership (and up to 8 overflow).
            db_pool_size=_count(env, "BLOOM_DB_POOL_SIZE", 11),
            max_waiting_claims=_count(env, "BLOOM_MAX_WAITING_CLAIMS", max(1, _count(env, "GUNICORN_THREADS", 128) - 8),
                                      minimum=0),
            db_connect_timeout_s=_count(env, "BLOOM_DB_CONNECT_TIMEOUT_S", 2),
            db_statement_timeout_ms=_count(env, "BLOOM_DB_STATEMENT_TIMEOUT_MS", 15000),
            db_lock_timeout_ms=_count(env, "BLOOM_DB_LOCK_TIMEOUT_MS", 5000),
            retention_completed_s=_count(env, "BLOOM_RETENTION_COMPLETED_S", 7 * 86400, minimum=0),
            retention_failed_s=_count(env, "BLOOM_RETENTION_FAILED_S", 30 * 86400, minimum=0),
            retention_audit_s=_count(env, "BLOOM_RETENTION_AUDIT_S", 30 * 86400, minimum=0),
            prune_interval_s=_seconds(env, "BLOOM_PRUNE_INTERVAL_S", 300.0),
            public_url=(env.get("BLOOM_PUBLIC_URL", "").strip().rstrip("/") or None),
            metrics_key=env.get("BLOOM_METRICS_KEY") or None,
            agent_key=env.get("MEMBRIDGE_AGENT_KEY", ""),
            dispatch_enabled=_switch(env, "BLOOM_DISPATCH"),
            worker_liveness_s=_seconds(env, "BLOOM_WORKER_LIVENESS_S", 60.0),
            operator_key=env.get("BLOOM_OPERATOR_KEY") or None,
            large_bodies_at_once=_count(env, "BLOOM_LARGE_BODIES_AT_ONCE", 2),
            agent_networks=_networks(env, "BLOOM_AGENT_NETWORKS", DEFAULT_AGENT_NETWORKS),
            max_running_per_key=_optional_count(env, "BLOOM_MAX_RUNNING_PER_KEY"),
        )
