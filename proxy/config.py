"""Configuration: one tree of frozen msgspec Structs, the only place options are defined.

Loaded from TOML (``--config FILE``), overridden by ``SWITCHBOARD_<SECTION>__<KEY>``
environment variables and by the quick-start command-line flags. Every error names the
file, the key and what is wrong, so a bad config fails before any worker starts.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from proxy.auth import HMAC_ALGORITHMS, PUBLIC_ALGORITHMS
from proxy.config_errors import FLAG_FOR_KEY, Origins, enum_choices

ENV_PREFIX = "SWITCHBOARD_"
BUNDLED_CONFIG = Path(__file__).with_name("examples") / "default.toml"
# What may appear in an HTTP request-target path: visible ASCII.
_URL_PATH = re.compile(r"[\x21-\x7e]*")


class ConfigError(Exception):
    """A configuration problem, with where it was found."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    """Addresses to listen on, ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    workers: int = 0
    """Worker processes; 0 means one per CPU core."""
    max_connections_per_worker: int = 9000
    """Client connections one worker holds; beyond it new ones get 503 + Retry-After."""
    retry_after_seconds: int = 1
    """The Retry-After value sent with 503 when a worker is full."""
    backlog: int = 4096
    """Listen backlog per worker socket (capped by net.core.somaxconn)."""
    drain_timeout: float = 30.0
    """Seconds a stopping worker waits for in-flight requests before exiting."""
    drain_retry_ms: int = 1000
    """The ``retry:`` hint (milliseconds) that ends SSE streams on a drain, telling clients
    when to reconnect (to another worker or host) and resume."""
    standby_worker: bool = True
    """Keep one worker process started and waiting, which takes the place of a worker
    that dies within milliseconds; false: a dead worker's replacement starts from
    scratch (seconds on a busy host)."""


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_header_bytes: int = 16384
    """Request line + headers; beyond it: 431."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Request body; beyond it: 413 (0 = unlimited)."""
    header_timeout: float = 10.0
    """Seconds to receive a complete request head once it started; beyond it: 408 + close."""
    keepalive_timeout: float = 60.0
    """Seconds an idle keep-alive client connection is kept before it is closed."""
    body_timeout: float = 60.0
    """Seconds of silence allowed while a request body is being received; beyond it: 408."""
    send_timeout: float = 60.0
    """Seconds a write to a client may block (a client that stops reading); beyond it the
    connection is closed."""


class UpstreamConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    connect_timeout: float = 5.0
    """Seconds to connect to a backend; failure or timeout: 502."""
    response_timeout: float = 60.0
    """Seconds from request sent to response head received on http routes; beyond it:
    504 (a route's own response_timeout overrides it)."""
    mcp_response_timeout: float = 300.0
    """The same for mcp routes: a tool call answered with plain JSON sends nothing until
    it is done, and MCP clients wait minutes for one (the reference SDK, 300 s)."""
    read_timeout: float = 300.0
    """Seconds of silence allowed inside a (non-streaming) response body; beyond it the
    exchange is aborted."""
    stream_idle_timeout: float = 0.0
    """Seconds of silence allowed on SSE responses and WebSocket tunnels (0 = no limit)."""
    tunnel_half_close_timeout: float = 5.0
    """Seconds a WebSocket tunnel stays open after one side closed its direction, for the
    other to finish (clients often never close after a server-initiated close)."""
    max_idle_per_backend: int = 64
    """Idle keep-alive connections kept per backend per worker (the pool's size cap)."""
    max_connections_per_backend: int = 0
    """Open connections per backend per worker (0 = unlimited); waiting longer than
    connect_timeout for one gives 503."""
    idle_ttl: float = 30.0
    """Seconds a pooled idle connection may wait before it is closed (keep below the
    backend's own keep-alive timeout)."""


class ForwardingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: Literal["preserve", "rewrite"] = "preserve"
    """preserve: pass the client's Host; rewrite: set Host to the backend's host:port."""
    x_forwarded_for: Literal["append", "replace"] = "append"
    """append the client address to an incoming X-Forwarded-For, or replace it."""
    via: str = "switchboard"
    """Pseudonym added to the Via header (RFC 9110 §7.6.3)."""


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    """One JSON line per request on stdout."""
    access_flush: Literal["batch", "line"] = "batch"
    """batch: access lines are written 64 at a time, or 0.25 s after the first of them,
    and on drain and exit; line: each is written and flushed as its request ends (about
    four times the cost of a line, for operators who tail the log request by request)."""


class HealthCheckConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    path: str = ""
    """Path probed with GET on every backend of the route ("" = no active checks)."""
    interval: float = 2.0
    """Seconds between probes."""
    timeout: float = 1.0
    """Seconds a probe may take; a slower answer counts as a failure."""
    rise: int = 2
    """Consecutive passing probes that bring a backend back."""
    fall: int = 2
    """Consecutive failing probes that take a backend out."""


class OAuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A route served as an OAuth 2.1 protected resource (MCP authorization; RFC 9728
    metadata, RFC 8707 audiences). See docs/mcp.md, "OAuth"."""

    resource: str = ""
    """The canonical URI of the route's endpoint as clients reach it (behind HAProxy: the
    public one), e.g. "https://mcp.example.com/mcp". Tokens must name it in ``aud``.
    "": the route is no OAuth resource."""
    authorization_servers: tuple[str, ...] = ()
    """Issuer identifiers of the authorization servers whose tokens are accepted (``iss``
    must be one of them); listed in the metadata for clients to discover."""
    scopes: tuple[str, ...] = ()
    """Scopes every request on the route needs (asked for in the 401 challenge)."""
    tool_scopes: dict[str, str] = msgspec.field(default_factory=dict)
    """Tool name -> the scope its ``tools/call`` needs (403 ``insufficient_scope`` naming
    it otherwise); ``tools/list`` shows a caller only the tools its scopes allow."""
    caller_headers: dict[str, str] = msgspec.field(default_factory=dict)
    """What the backend is told of the caller, set by the proxy (a client's own copies are
    removed): "subject", "client_id" or "scopes" -> header name."""


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prefix: str
    """Path prefix matched against the request target (longest prefix wins)."""
    backends: tuple[str, ...]
    """Backend base URLs, http://HOST:PORT[/PATH]."""
    kind: Literal["http", "mcp"] = "http"
    """http: a plain reverse-proxy route; mcp: MCP-aware (sessions, eras, JSON-RPC)."""
    origins: tuple[str, ...] = ()
    """mcp: Origin values allowed (e.g. "https://app.example", "http://localhost:*" for
    any port); a request with any other Origin header gets 403. Empty: same-origin and
    loopback origins only. Requests without Origin (non-browser clients) pass."""
    keepalive_interval: float = 15.0
    """mcp: seconds of silence on an SSE stream before a keep-alive comment is sent
    (0 = never)."""
    health: HealthCheckConfig = HealthCheckConfig()
    eject_after: int = 3
    """Consecutive connect failures or 5xx answers that take a backend out of rotation
    (0 = never)."""
    eject_seconds: float = 10.0
    """How long an ejected backend stays out before it is tried again."""
    host: Literal["preserve", "rewrite"] | None = None
    """Overrides forwarding.host for this route."""
    strip_prefix: bool = False
    """Remove the prefix before forwarding (a backend URL path is then prepended)."""
    auth: Literal["default", "none", "required"] = "default"
    """Whether callers must present an API key or JWT: "default" follows auth.required."""
    tenants: tuple[str, ...] = ()
    """With auth: only identities of these tenants may use the route (others get 403).
    Empty: any tenant."""
    forward_credentials: bool = False
    """With auth: pass the client's credential header on to the backend (by default the
    proxy consumes it, so backends never see callers' keys or tokens)."""
    response_timeout: float = 0.0
    """Seconds to wait for the backend's response head on this route (0: the kind's
    default, upstream.response_timeout or upstream.mcp_response_timeout)."""
    oauth: OAuthConfig = OAuthConfig()
    backend_era: Literal["any", "2025-11-25", "2026-07-28", "auto"] = "any"
    """mcp: the MCP revision the route's backends speak. "any": both (or whichever the
    client speaks), requests pass untranslated; "2026-07-28": handshake-era clients
    (2025-03-26 to 2025-11-25) are translated to stateless requests at the proxy
    (docs/mcp.md, "Era translation"); "2025-11-25": 2026-07-28 clients are translated
    to sessions the proxy opens upstream; "auto": each worker probes one backend of the
    route (``proxy.protocol.era_probe``) and translates for what it found."""


class McpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    session_keys: dict[str, str] = msgspec.field(default_factory=dict)
    """Key id -> secret (at least 32 characters) for the session tokens the proxy hands
    to MCP clients. Every proxy that should continue a session needs the same keys."""
    current_key: str = ""
    """The key id new tokens are signed with (default: the only key). Old keys keep
    verifying: rotate by adding a key, making it current, removing the old one later."""


class ProxyProtocolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    """Expect a PROXY protocol v1/v2 header (HAProxy send-proxy / send-proxy-v2) from
    trusted sources."""
    trusted_networks: tuple[str, ...] = ()
    """CIDRs allowed to send a PROXY header; they must send one. Anyone else sending one
    is refused."""
    timeout: float = 3.0
    """Seconds to receive the whole PROXY header; beyond it the connection is closed."""


class AdminConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:9901"
    """Admin endpoints (/health, /ready, /metrics, /services); "" turns them off."""


class DatabaseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = ""
    """PostgreSQL DSN, usually PgBouncer's address (transaction pooling is fine). Empty:
    no control-plane database; routes come from this file only and no keys exist."""
    poll_interval: float = 1.0
    """Seconds between checks of the config_version row; changes reach workers this fast."""
    state_dir: str = "/var/lib/switchboard"
    """Where the last good snapshot (snapshot.json) and audit spill files are kept."""
    pool_size: int = 2
    """PostgreSQL connections per worker (snapshot polling and audit writes only)."""
    connect_timeout: float = 3.0
    """Seconds to connect (or get a pooled connection) before PostgreSQL counts as down."""
    statement_timeout: float = 5.0
    """Seconds a snapshot read may take."""
    ready_grace: float = 60.0
    """Seconds PostgreSQL may be unreachable before /ready answers 503 (the snapshot keeps
    serving either way); 0: never degrade."""
    audit: bool = True
    """Write one usage record per request to usage_records (batched, in the background)."""
    audit_batch_size: int = 500
    audit_flush_interval: float = 1.0
    """Seconds between audit writes."""
    audit_max_buffer: int = 10000
    """Records held in memory per worker before the oldest are spilled to disk."""


class RedisConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = ""
    """redis://[:PASSWORD@]HOST:PORT[/DB] shared by every proxy for global rate limits and
    connection caps. Empty: limits are per worker only."""
    command_timeout: float = 0.25
    """Seconds a rate-limit decision may wait for Redis before the local fallback decides."""
    fail_mode: Literal["open", "closed"] = "open"
    """While Redis is unreachable: "open" lets each worker enforce every limit on its own
    (availability first); "closed" answers 503 to requests under any rate limit, and
    gives each worker cap // workers of each connection cap."""


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    required: bool = False
    """Whether routes require an API key or JWT unless they say otherwise (route.auth)."""
    header: str = "authorization"
    """Header carrying the credential: "authorization" (Bearer) or e.g. "x-api-key"
    (the raw key or token)."""
    jwt_algorithms: tuple[str, ...] = ()
    """JWT algorithms accepted (HS256, RS256, ES256, ...); empty: JWTs are not accepted.
    "none" is never accepted."""
    jwt_secret: str = ""
    """Shared secret for HS* algorithms."""
    jwt_jwks_file: str = ""
    """JWKS file with the public keys for RS/PS/ES/EdDSA algorithms."""
    jwt_jwks_url: str = ""
    """JWKS URL, fetched in the background and cached (jwt_jwks_max_age)."""
    jwt_jwks_max_age: float = 3600.0
    jwt_audience: str = ""
    """Required "aud"; empty: tokens carrying an "aud" are refused."""
    jwt_issuer: str = ""
    """Required "iss"; empty: not checked."""
    jwt_leeway: float = 30.0
    """Seconds of clock skew allowed on exp and nbf."""
    jwt_tenant_claim: str = "tenant"
    """The claim naming the caller's tenant."""


class RateLimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    per_ip: int = 0
    """Requests per minute per client IP (0: no limit)."""
    per_key: int = 0
    """Requests per minute per API key or JWT subject, unless the key sets its own."""
    per_tenant: int = 0
    """Requests per minute per tenant, unless the tenant sets its own."""
    per_tool: int = 0
    """tools/call requests per minute per identity and tool, unless the key sets its own."""
    burst: int = 0
    """Requests allowed at once from idle; 0: the per-minute limit itself."""
    max_connections_per_ip: int = 0
    """Concurrent client connections per IP across every proxy (0: no cap)."""
    max_connections_per_tenant: int = 0
    """Concurrent client connections per tenant across every proxy (0: no cap)."""
    connection_lease_ttl: float = 15.0
    """Seconds a dead worker's connections keep counting against the caps."""
    local_max_keys: int = 100000
    """Buckets a worker keeps for its local pre-check and fallback (LRU)."""


class DemoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    """Start the bundled demo MCP backend beside the proxy (make run)."""
    listen: str = "127.0.0.1:8931"


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """OpenTelemetry traces, exported over OTLP/HTTP (docs/operations.md, "Traces")."""

    sample_ratio: float = 0.0
    """The share of requests without a sampled parent that are traced (0-1). A request
    whose ``traceparent`` says sampled is traced whenever this is above 0. 0: tracing
    is off, and costs nothing."""
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    """The OTLP/HTTP traces endpoint of a collector."""
    service_name: str = "switchboard"
    export_timeout: float = 10.0
    """Seconds an export may take (in the exporter's thread, never on a request)."""
    max_queue_size: int = 2048
    """Spans held for export; past it new spans are dropped, never waited for."""


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    log: LogConfig = LogConfig()
    routes: tuple[RouteConfig, ...] = ()
    mcp: McpConfig = McpConfig()
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    admin: AdminConfig = AdminConfig()
    demo: DemoConfig = DemoConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    tracing: TracingConfig = TracingConfig()


def parse_hostport(value: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT``; raises ValueError with the reason."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    return (host or default_host), int(port_text)


def parse_backend_url(url: str) -> tuple[str, int, str]:
    """``http://host:port/path`` -> (host, port, path-without-trailing-slash)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"backend URL must start with http:// (got {url!r})")
    if not parts.hostname:
        raise ValueError(f"backend URL has no host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"backend URL must not have a query or fragment: {url!r}")
    try:
        port = 80 if parts.port is None else parts.port
    except ValueError as exc:
        raise ValueError(f"backend URL has a bad port: {url!r}") from exc
    if port == 0:
        raise ValueError(f"backend URL port must be 1-65535: {url!r}")
    path = parts.path.rstrip("/")
    if not _URL_PATH.fullmatch(path):
        raise ValueError(
            f"backend URL path must be printable ASCII without spaces "
            f"(percent-encode anything else): {url!r}"
        )
    return parts.hostname, port, path


def _positive(source: str, key: str, value: float, *, allow_zero: bool = False) -> None:
    if math.isnan(value):
        raise ConfigError(source, key, "must be a number, got nan")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(source, key, f"must be {bound}, got {value}")


def validate_routes(routes: tuple[RouteConfig, ...], source: str) -> None:
    """The checks of [[routes]] tables (also applied to routes from the database)."""
    seen: set[str] = set()
    for i, route in enumerate(routes):
        key = f"routes[{i}]"
        if not route.prefix.startswith("/"):
            raise ConfigError(source, f"{key}.prefix", f"must start with '/', got {route.prefix!r}")
        if route.prefix in seen:
            raise ConfigError(source, f"{key}.prefix", f"duplicate prefix {route.prefix!r}")
        seen.add(route.prefix)
        if not route.backends:
            raise ConfigError(source, f"{key}.backends", "needs at least one backend URL")
        for j, url in enumerate(route.backends):
            try:
                parse_backend_url(url)
            except ValueError as exc:
                raise ConfigError(source, f"{key}.backends[{j}]", str(exc)) from None
        if len(set(route.backends)) != len(route.backends):
            raise ConfigError(source, f"{key}.backends", "lists a backend twice")
        _positive(source, f"{key}.keepalive_interval", route.keepalive_interval, allow_zero=True)
        _positive(source, f"{key}.eject_after", route.eject_after, allow_zero=True)
        _positive(source, f"{key}.eject_seconds", route.eject_seconds)
        _positive(source, f"{key}.response_timeout", route.response_timeout, allow_zero=True)
        if route.backend_era != "any" and route.kind != "mcp":
            raise ConfigError(source, f"{key}.backend_era", 'applies to kind = "mcp" routes only')
        health = route.health
        if health.path and not health.path.startswith("/"):
            raise ConfigError(source, f"{key}.health.path", "must start with '/'")
        for name in ("interval", "timeout", "rise", "fall"):
            _positive(source, f"{key}.health.{name}", getattr(health, name))
        if route.oauth != OAuthConfig():
            from proxy.oauth import oauth_config_problem

            problem = oauth_config_problem(route)
            if problem is not None:
                raise ConfigError(source, f"{key}.oauth.{problem[0]}", problem[1])


def validate(config: Config, source: str) -> Config:
    """Semantic checks msgspec's types cannot express."""
    for i, listen in enumerate(config.server.listen):
        try:
            parse_hostport(listen)
        except ValueError as exc:
            raise ConfigError(source, f"server.listen[{i}]", str(exc)) from None
    if not config.server.listen:
        raise ConfigError(source, "server.listen", "needs at least one address")
    _positive(source, "server.workers", config.server.workers, allow_zero=True)
    _positive(source, "server.max_connections_per_worker", config.server.max_connections_per_worker)
    _positive(source, "server.backlog", config.server.backlog)
    _positive(source, "server.drain_timeout", config.server.drain_timeout, allow_zero=True)
    _positive(source, "server.drain_retry_ms", config.server.drain_retry_ms, allow_zero=True)
    _positive(
        source, "server.retry_after_seconds", config.server.retry_after_seconds, allow_zero=True
    )
    limits = config.limits
    if limits.max_header_bytes < 256:
        raise ConfigError(source, "limits.max_header_bytes", "must be at least 256")
    _positive(source, "limits.max_body_bytes", limits.max_body_bytes, allow_zero=True)
    for name in ("header_timeout", "keepalive_timeout", "body_timeout", "send_timeout"):
        _positive(source, f"limits.{name}", getattr(limits, name))
    up = config.upstream
    for name in (
        "connect_timeout",
        "response_timeout",
        "mcp_response_timeout",
        "read_timeout",
        "idle_ttl",
        "tunnel_half_close_timeout",
    ):
        _positive(source, f"upstream.{name}", getattr(up, name))
    for name in ("stream_idle_timeout", "max_idle_per_backend", "max_connections_per_backend"):
        _positive(source, f"upstream.{name}", getattr(up, name), allow_zero=True)
    validate_routes(config.routes, source)
    mcp = config.mcp
    for kid, secret in mcp.session_keys.items():
        if len(secret) < 32:
            raise ConfigError(source, f"mcp.session_keys.{kid}", "must be at least 32 characters")
    if mcp.current_key and mcp.current_key not in mcp.session_keys:
        raise ConfigError(source, "mcp.current_key", f"no key {mcp.current_key!r} in session_keys")
    if len(mcp.session_keys) > 1 and not mcp.current_key:
        raise ConfigError(source, "mcp.current_key", "required when there are several keys")
    pp = config.proxy_protocol
    _positive(source, "proxy_protocol.timeout", pp.timeout)
    for i, cidr in enumerate(pp.trusted_networks):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ConfigError(source, f"proxy_protocol.trusted_networks[{i}]", str(exc)) from None
    if pp.enabled and not pp.trusted_networks:
        raise ConfigError(
            source,
            "proxy_protocol.trusted_networks",
            "needs at least one network when proxy_protocol is enabled",
        )
    if config.admin.listen:
        try:
            parse_hostport(config.admin.listen)
        except ValueError as exc:
            raise ConfigError(source, "admin.listen", str(exc)) from None
        if config.admin.listen in config.server.listen:
            raise ConfigError(source, "admin.listen", "must differ from server.listen")
    if config.demo.enabled:
        try:
            parse_hostport(config.demo.listen)
        except ValueError as exc:
            raise ConfigError(source, "demo.listen", str(exc)) from None
    _validate_control_plane(config, source)
    return config


def _validate_control_plane(config: Config, source: str) -> None:
    db = config.database
    for name in ("poll_interval", "connect_timeout", "statement_timeout", "audit_flush_interval"):
        _positive(source, f"database.{name}", getattr(db, name))
    for name in ("pool_size", "audit_batch_size", "audit_max_buffer"):
        _positive(source, f"database.{name}", getattr(db, name))
    _positive(source, "database.ready_grace", db.ready_grace, allow_zero=True)
    if db.url and not db.state_dir:
        raise ConfigError(source, "database.state_dir", "needed when database.url is set")
    redis = config.redis
    if redis.url:
        try:
            parse_redis_url(redis.url)
        except ValueError as exc:
            raise ConfigError(source, "redis.url", str(exc)) from None
    _positive(source, "redis.command_timeout", redis.command_timeout)
    auth = config.auth
    if not auth.header or not auth.header.replace("-", "").isalnum():
        raise ConfigError(source, "auth.header", f"not a header name: {auth.header!r}")
    algorithms = set(auth.jwt_algorithms)
    if "none" in {a.lower() for a in algorithms}:
        raise ConfigError(source, "auth.jwt_algorithms", '"none" is never accepted')
    known = HMAC_ALGORITHMS | PUBLIC_ALGORITHMS
    if algorithms - known:
        raise ConfigError(
            source, "auth.jwt_algorithms", f"unsupported: {sorted(algorithms - known)}"
        )
    if algorithms & HMAC_ALGORITHMS and len(auth.jwt_secret) < 32:
        raise ConfigError(source, "auth.jwt_secret", "HS* needs a secret of 32+ characters")
    if algorithms & PUBLIC_ALGORITHMS and not (auth.jwt_jwks_file or auth.jwt_jwks_url):
        raise ConfigError(
            source, "auth.jwt_jwks_file", "public-key algorithms need jwt_jwks_file or _url"
        )
    for i, route in enumerate(config.routes):
        if route.oauth.resource and not algorithms:
            raise ConfigError(
                source, f"routes[{i}].oauth.resource", "an OAuth resource needs auth.jwt_algorithms"
            )
    tracing = config.tracing
    if not 0.0 <= tracing.sample_ratio <= 1.0:
        raise ConfigError(
            source, "tracing.sample_ratio", f"must be 0-1, got {tracing.sample_ratio}"
        )
    if tracing.sample_ratio and urlsplit(tracing.endpoint).scheme not in ("http", "https"):
        raise ConfigError(source, "tracing.endpoint", f"not an http(s) URL: {tracing.endpoint!r}")
    _positive(source, "tracing.export_timeout", tracing.export_timeout)
    _positive(source, "tracing.max_queue_size", tracing.max_queue_size)
    _positive(source, "auth.jwt_jwks_max_age", auth.jwt_jwks_max_age)
    _positive(source, "auth.jwt_leeway", auth.jwt_leeway, allow_zero=True)
    rl = config.rate_limits
    for name in (
        "per_ip",
        "per_key",
        "per_tenant",
        "per_tool",
        "burst",
        "max_connections_per_ip",
        "max_connections_per_tenant",
    ):
        _positive(source, f"rate_limits.{name}", getattr(rl, name), allow_zero=True)
    _positive(source, "rate_limits.connection_lease_ttl", rl.connection_lease_ttl)
    _positive(source, "rate_limits.local_max_keys", rl.local_max_keys)
    needs_auth = auth.required or any(r.auth == "required" for r in config.routes)
    if needs_auth and not (db.url or algorithms):
        raise ConfigError(
            source,
            "auth.required",
            "authentication needs API keys (database.url) or JWTs (auth.jwt_algorithms)",
        )


def parse_redis_url(url: str) -> tuple[str, int, int, str | None]:
    """``redis://[:PASSWORD@]HOST[:PORT][/DB]`` -> (host, port, db, password)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"expected redis://HOST:PORT[/DB], got {url!r}")
    if not parts.hostname:
        raise ValueError(f"Redis URL has no host: {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"Redis URL has a bad port: {url!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"Redis database must be a number: {url!r}")
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, int(path or 0), password


def _msgspec_error(source: str, exc: msgspec.ValidationError) -> ConfigError:
    # msgspec says "Expected `int`, got `str` - at `$.server.workers`"; turn the JSON path
    # into the TOML key an operator typed.
    text = str(exc)
    problem, _, path = text.rpartition(" - at `")
    if not problem:
        problem, path = text, "$"  # msgspec names no path for top-level problems
    key = path.rstrip("`").removeprefix("$").lstrip(".")
    problem = problem.replace("`", "")
    if problem.startswith("Object contains unknown field"):
        problem = "unknown key " + problem.rsplit(" ", 1)[-1]
    elif problem.startswith("Invalid enum value"):
        choices = enum_choices(Config, key)
        if choices:
            problem += " (valid values: " + ", ".join(choices) + ")"
    return ConfigError(source, key or "(top level)", problem)


def _attributed(exc: ConfigError, origins: Origins) -> ConfigError:
    """``exc`` naming the environment variable or flag that set the key, when one did
    (the file is named otherwise)."""
    key = exc.key
    if exc.problem.startswith("unknown key "):
        name = exc.problem.rsplit(" ", 1)[-1]
        key = f"{key}.{name}" if key and key != "(top level)" else name
    origin = origins.origin_of(key)
    if origin is None or origin == exc.source or origin == origins.file:
        return exc
    return ConfigError(origin, exc.key, exc.problem)


def from_mapping(data: Mapping[str, Any], source: str) -> Config:
    try:
        config = msgspec.convert(data, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        raise _msgspec_error(source, exc) from None
    return validate(config, source)


def _env_overrides(environ: Mapping[str, str], origins: Origins) -> dict[str, dict[str, Any]]:
    """``SWITCHBOARD_LIMITS__MAX_BODY_BYTES=1048576`` -> {"limits": {"max_body_bytes": ...}}.

    Values are read as TOML values, so numbers, booleans and ``["a", "b"]`` lists work;
    anything that does not parse as TOML is taken as a string.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
        origins.record(f"{section}.{key}", f"environment variable {name}")
        origins.record(section, f"environment variable {name}")
    return out


def load(
    path: str | os.PathLike[str] | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    routes: list[dict[str, Any]] | None = None,
    origins: Origins | None = None,
) -> Config:
    """Read a TOML file (or the bundled default when ``path`` is None and no routes are
    given on the command line), then apply environment and command-line overrides.
    ``origins``, when given, is filled with where each key's value came from; errors name
    the environment variable or flag behind a bad value rather than the file."""
    origins = Origins() if origins is None else origins
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None or routes is None:
        file = Path(path) if path is not None else BUNDLED_CONFIG
        source = origins.file = str(file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(source, "", "file not found") from None
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "", f"not valid TOML: {exc}") from None
        for section, values in data.items():
            origins.record(section, source)
            for key in values if isinstance(values, dict) else ():
                origins.record(f"{section}.{key}", source)
    layers: list[tuple[Mapping[str, Mapping[str, Any]], str | None]] = [
        (_env_overrides(os.environ if environ is None else environ, origins), None)
    ]
    if overrides:
        layers.append((overrides, "the command line"))
    for layer, layer_origin in layers:
        for section, values in layer.items():
            for key in values:
                if layer_origin is not None:
                    where = FLAG_FOR_KEY.get(f"{section}.{key}", layer_origin)
                    origins.record(f"{section}.{key}", where)
            current = data.get(section)
            if current is not None and not isinstance(current, dict):
                blamed = origins.origin_of(section) if layer_origin is None else layer_origin
                raise ConfigError(blamed or source, section, "must be a table")
            data[section] = {**(current or {}), **values}
    if routes is not None:
        data["routes"] = routes if path is None else [*data.get("routes", []), *routes]
    try:
        return from_mapping(data, source)
    except ConfigError as exc:
        raise _attributed(exc, origins) from None


def parse_route_flag(value: str, kind: str = "http") -> dict[str, Any]:
    """``PREFIX=URL[,URL...]`` from ``--route`` (or ``--mcp``, with kind "mcp")."""
    prefix, sep, urls = value.partition("=")
    if not sep or not prefix or not urls:
        raise ValueError(f"expected PREFIX=URL[,URL...], got {value!r}")
    route: dict[str, Any] = {
        "prefix": prefix,
        "backends": [u.strip() for u in urls.split(",") if u.strip()],
    }
    if kind != "http":
        route["kind"] = kind
    return route


def effective_workers(config: Config) -> int:
    return config.server.workers or (os.cpu_count() or 1)


def to_json(config: Config) -> bytes:
    return msgspec.json.encode(config)


def from_json(data: bytes) -> Config:
    return msgspec.json.decode(data, type=Config)


def with_session_key(config: Config, kid: str, secret: str) -> Config:
    """The config with a session key added when MCP routes exist but none is configured
    (sessions then survive reloads of this supervisor, not its restart)."""
    # With a database, MCP routes may appear at any time, so a key is always needed.
    wanted = config.database.url or any(r.kind == "mcp" for r in config.routes)
    if config.mcp.session_keys or not wanted:
        return config
    return msgspec.structs.replace(
        config, mcp=McpConfig(session_keys={kid: secret}, current_key=kid)
    )
