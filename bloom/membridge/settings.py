"""The Membridge settings operators change at run time, kept in `runtime_settings`.

Stored values override the environment's defaults. Every process reads them through
a short cache, so a change made through any gunicorn process or host is seen by all
within CACHE_SECONDS. The admin key leaves this module only masked, or in the header
the Membridge client sends upstream.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..db import Database
from ..stamps import new_id, now_ms

log = logging.getLogger(__name__)

CACHE_SECONDS = 2.0
# The last upstream result of any process (sync, proxy call or connection test).
UPSTREAM_STATUS_KEY = "membridge_sync_status"
_KEYS = ["membridge_server_url", "admin_key", "connected", "last_test", UPSTREAM_STATUS_KEY]
_STATUS_FIELDS = ("consecutiveFailures", "lastSuccess", "lastError", "connected")


def mask_key(key: str) -> str:
    if len(key) <= 8:
        return "****"
    return f"{key[:4]}****{key[-4:]}"


@dataclass(frozen=True)
class MembridgeConfig:
    server_url: str
    admin_key: str
    connected: bool
    last_test: int | None
    upstream_status: dict[str, Any] | None

    def public(self, own_status: dict[str, Any]) -> dict[str, Any]:
        """The RuntimeConfig object of the API: never the key itself. `connected` is the
        last upstream result (the same as /health's), not only the last test's."""
        return {
            "membridge_server_url": self.server_url,
            "admin_key_masked": mask_key(self.admin_key),
            "connected": bool(self.freshest_status(own_status)["connected"]),
            "last_test": self.last_test,
        }

    def freshest_status(self, own_status: dict[str, Any]) -> dict[str, Any]:
        """The newer of this process's own upstream outcome and the deployment's shared one."""
        shared = self.upstream_status or {}
        freshest = shared if shared.get("observedAt", 0) > own_status.get("observedAt", 0) else own_status
        return {key: freshest.get(key) for key in _STATUS_FIELDS}


class MembridgeSettingsStore:
    def __init__(self, database: Database, *, default_server_url: str, default_admin_key: str) -> None:
        self._db = database
        self._defaults = MembridgeConfig(default_server_url, default_admin_key, False, None, None)
        self._cached = self._defaults
        self._cached_at = float("-inf")
        self._lock = threading.Lock()
        self._failed_reads = 0

    def current(self, *, fresh: bool = False) -> MembridgeConfig:
        """The settings, read through the cache; `fresh` reads the database now (GET
        /config: right after a connection test or a change made through any process, the
        answer must show it)."""
        with self._lock:
            if not fresh and time.monotonic() - self._cached_at < CACHE_SECONDS:
                return self._cached
        try:
            config = self._read()
        except Exception as error:
            # The database is down: keep serving with what we knew last. Said once when the
            # reads start failing and once when they work again, not at every read.
            if not self._failed_reads:
                log.warning("runtime settings unreadable (%s); using the last known ones", type(error).__name__)
            with self._lock:
                self._failed_reads += 1
                self._cached_at = time.monotonic()  # try again after CACHE_SECONDS, not on every call
                return self._cached
        with self._lock:
            self._cached, self._cached_at = config, time.monotonic()
            failed, self._failed_reads = self._failed_reads, 0
        if failed:
            log.warning("runtime settings readable again, after %d failed read(s)", failed)
        return config

    def cached(self) -> MembridgeConfig:
        """What this process knew last, without any I/O (for /health). Kept fresh by
        `refresh_in_background` in serving processes."""
        with self._lock:
            return self._cached

    def refresh_in_background(self) -> None:
        """Re-read the settings every CACHE_SECONDS on a daemon thread of this process."""

        def refresh_forever() -> None:
            while True:
                self.current()
                time.sleep(CACHE_SECONDS)

        threading.Thread(target=refresh_forever, name="bloom-settings-refresh", daemon=True).start()

    def target(self) -> tuple[str, str]:
        config = self.current()
        return config.server_url, config.admin_key

    def _read(self) -> MembridgeConfig:
        with self._db.autocommit() as tx:
            rows = {row["key"]: row["value"] for row in tx.all("get_settings", keys=_KEYS)}
        last_test = rows.get("last_test")
        stored_admin_key = rows.get("admin_key")
        return MembridgeConfig(
            server_url=rows.get("membridge_server_url") or self._defaults.server_url,
            admin_key=stored_admin_key if stored_admin_key is not None else self._defaults.admin_key,
            connected=rows.get("connected") == "true",
            last_test=int(last_test) if last_test and last_test.isdigit() else None,
            upstream_status=_json_or_none(rows.get(UPSTREAM_STATUS_KEY)),
        )

    def _forget(self) -> None:
        with self._lock:
            self._cached_at = float("-inf")

    def update(self, server_url: str, admin_key: str, *, actor: str) -> MembridgeConfig:
        with self._db.autocommit() as tx:
            tx.one(
                "save_membridge_config",
                server_url=server_url, admin_key=admin_key, now=now_ms(), audit_id=new_id(), actor=actor,
            )
        self._forget()
        return self.current()

    def record_connection_test(self, connected: bool, *, actor: str) -> MembridgeConfig:
        server_url = self.current().server_url
        with self._db.autocommit() as tx:
            tx.one(
                "save_connection_test",
                connected=connected, connected_text="true" if connected else "false",
                server_url=server_url, now=now_ms(), audit_id=new_id(), actor=actor,
            )
        self._forget()
        return self.current()

    def publish_upstream_status(self, status: dict[str, Any]) -> None:
        with self._db.autocommit() as tx:
            tx.execute("put_setting", key=UPSTREAM_STATUS_KEY, value=json.dumps(status), now=now_ms())
        self._forget()


def _json_or_none(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
