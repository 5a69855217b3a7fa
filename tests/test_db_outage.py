"""A host whose database stops answering — behind a pooler or proxy that takes the bytes
and never answers, where no TCP timeout fires — answers 503 with Retry-After within
seconds, whatever its pooled connections do, and serves again once the path heals
(bloom/db_reachability.py)."""
from __future__ import annotations

import time

import pytest
import requests

from .helpers import TASK
from .support import GunicornServer, StallingRelay, wait_until

pytestmark = pytest.mark.slow  # gunicorn and a relay of its own


def test_a_database_that_stops_answering_gets_503s_within_seconds_and_serves_again_after(postgres):
    name = postgres.create_database()
    relay = StallingRelay(postgres.admin_url)
    served = GunicornServer({"DATABASE_URL": relay.url_for(name)}, workers=2)
    create = served.url("/api/runtime/llm-tasks")
    try:
        for _ in range(6):  # every process has pooled connections open through the relay
            assert requests.post(create, json=TASK, timeout=10).status_code == 201
        relay.stall()
        started = time.monotonic()
        refused = requests.post(create, json=TASK, timeout=15)
        waited_s = time.monotonic() - started
        assert refused.status_code == 503 and refused.headers.get("Retry-After") == "2", refused.text
        assert waited_s < 5, waited_s  # a ping a second, each given 1.5 s: about 2.5 s at most
        started = time.monotonic()
        assert requests.get(served.url("/api/runtime/ready"), timeout=15).status_code == 503
        assert time.monotonic() - started < 3
        later = requests.post(create, json=TASK, timeout=15)  # a new request, not a hung one
        assert later.status_code == 503
        time.sleep(5)  # an outage of some seconds: what the processes say of it (below)
        relay.heal()
        wait_until(lambda: requests.post(create, json=TASK, timeout=15).status_code == 201, timeout=15,
                   what="the host to serve again after the heal")
        wait_until(lambda: requests.get(served.url("/api/runtime/ready"), timeout=5).status_code == 200, timeout=10,
                   what="every process to say it is ready again")
        # The outage is said once per process, not at every read of the settings (every 2 s).
        assert served.log().count("runtime settings unreadable") <= 2, served.log()
    finally:
        served.stop()
        relay.close()
        postgres.drop_database(name)
