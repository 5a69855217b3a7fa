"""Which X-Forwarded-* headers to believe: only those a trusted reverse proxy set.

ProxyFix alone believes the last N hops of X-Forwarded-For from any peer, so a client
that talks to the service directly could name any address it likes (and escape its rate
limit, or forge the log). Here the forwarded headers count only when the direct peer
(REMOTE_ADDR) is one of the trusted proxies; from anyone else they are removed before
the application sees them. This is what gunicorn's `forwarded_allow_ips` does for the
scheme, applied to every forwarded header.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from werkzeug.middleware.proxy_fix import ProxyFix

FORWARDED_HEADERS = (
    "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_PREFIX", "HTTP_FORWARDED",
)

PEERS_REMEMBERED = 4096


class TrustedProxies:
    def __init__(self, app, networks: Iterable[str], hops: int) -> None:
        self._app = app
        self._networks = [ipaddress.ip_network(network, strict=False) for network in networks]
        # The answer for each direct peer seen lately: parsing an address costs more than
        # the rest of this middleware, and the peers of a service are few (its proxies).
        self._peers_seen: dict[str, bool] = {}
        self._via_proxy = ProxyFix(app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops) if hops > 0 else None

    def __call__(self, environ, start_response):
        if self._via_proxy is not None and self._is_trusted(environ.get("REMOTE_ADDR", "")):
            return self._via_proxy(environ, start_response)
        for header in FORWARDED_HEADERS:
            environ.pop(header, None)
        return self._app(environ, start_response)

    def _is_trusted(self, peer: str) -> bool:
        trusted = self._peers_seen.get(peer)
        if trusted is None:
            trusted = self._matches(peer)
            if len(self._peers_seen) >= PEERS_REMEMBERED:
                self._peers_seen.clear()  # bounded, whoever connects
            self._peers_seen[peer] = trusted
        return trusted

    def _matches(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)
