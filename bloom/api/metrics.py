"""GET /metrics: the Prometheus text format (open, or behind BLOOM_METRICS_KEY)."""
from __future__ import annotations

import hmac

from flask import Blueprint, Response, request

from .. import metrics
from ..errors import ApiError
from ..services import services
from ..web.openapi import documented
from ..web.rate_limits import within_failed_auth_limit

bp = Blueprint("metrics", __name__)


class MetricsUnauthorized(ApiError):
    status = 401


class TooManyAttempts(ApiError):
    status = 429


@bp.get("/metrics")
@documented("Prometheus metrics (text format 0.0.4)", responses={200: "Text", 401: "Error", 429: "Error"})
def scrape():
    key = services().settings.metrics_key
    if key:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.encode()):
            if not within_failed_auth_limit():
                raise TooManyAttempts("Too many requests, please try again later")
            raise MetricsUnauthorized("Unauthorized")
    return Response(metrics.exposition(services().records.queue_state), content_type=metrics.CONTENT_TYPE)
