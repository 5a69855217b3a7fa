"""Client of the Membridge agents, the nodes that run pushed tasks (SPEC §7).

Two calls: a health probe (`GET {url}/health`, 2 s) and the delivery of a task
(`POST {url}/execute-task`). An agent answers a delivery only when its run has ended,
up to `policy.timeout_sec + 10` s later, so a delivery is split in two: `send_task`
connects and writes the request, and says whether the agent refused it at once
(connection refused, 5xx, 503 "Claude CLI is not installed"); `PendingRun.answer`
then waits for the end of the run, on the caller's own thread. That split is why a
delivery uses http.client directly: requests hides the moment a request was taken.
The agent key travels only in the X-MEMBRIDGE-AGENT header; it is never logged and
never part of an error message.
"""
from __future__ import annotations

import http.client
import json
import select
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

AGENT_HEADER = "X-MEMBRIDGE-AGENT"
CONNECT_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 2.0
# A refusal comes at once; an agent still silent after this has taken the request.
ACCEPT_WINDOW_S = 0.5
# Beyond the timeout_sec + 10 s the agent promises, before we stop waiting for its answer.
ANSWER_GRACE_S = 30.0
MAX_ANSWER_BYTES = 32 * 1024 * 1024


class AgentUnreachable(Exception):
    """The request could not be delivered (no connection, or it broke while sending)."""


@dataclass(frozen=True)
class AgentAnswer:
    """What an agent said about a run: an HTTP status and its body, or why none came."""

    status: int | None
    body: Any
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def says_no_cli(self) -> bool:
        """The agent's 503 "Claude CLI is not installed on this node": it cannot run anything."""
        detail = self.body.get("detail") if isinstance(self.body, dict) else self.body
        return self.status == 503 and isinstance(detail, str) and "cli" in detail.lower()

    def describe(self) -> str:
        if self.status is None:
            return f"agent gave no answer: {self.problem}"
        if isinstance(self.body, dict):
            for key in ("detail", "error", "error_message"):
                if isinstance(self.body.get(key), str):
                    return f"agent answered {self.status}: {self.body[key][:500]}"
        return f"agent answered {self.status}"


class PendingRun:
    """A delivered task whose agent has not answered yet; owns its connection."""

    def __init__(self, connection: http.client.HTTPConnection, answer_timeout_s: float) -> None:
        self._connection = connection
        self._answer_timeout_s = answer_timeout_s

    def answered_within(self, seconds: float) -> bool:
        """True when the agent has started to answer within `seconds` (a refusal, or a very short run)."""
        sock = self._connection.sock
        if sock is None:
            return True  # closed already: answer() says how
        readable, _, _ = select.select([sock], [], [], seconds)
        return bool(readable)

    def answer(self) -> AgentAnswer:
        """Wait for the end of the run (bounded), then close the connection."""
        try:
            if self._connection.sock is not None:
                self._connection.sock.settimeout(self._answer_timeout_s)
            response = self._connection.getresponse()
            raw = response.read(MAX_ANSWER_BYTES + 1)
            if len(raw) > MAX_ANSWER_BYTES:
                return AgentAnswer(response.status, None, "answer too large")
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw[:500].decode("utf-8", errors="replace")
            return AgentAnswer(response.status, body)
        except (OSError, http.client.HTTPException) as error:
            return AgentAnswer(None, None, _describe(error))
        finally:
            self._connection.close()


class AgentClient:
    def __init__(self, agent_key: str, session: requests.Session | None = None) -> None:
        self._agent_key = agent_key
        self._session = session or requests.Session()  # probes: no retries, a failed probe is the answer

    def probe(self, url: str) -> bool:
        """Does the agent's /health answer 2xx within PROBE_TIMEOUT_S? Asked twice before
        the answer is no: one lost packet or busy moment must not send its runs elsewhere."""
        return self._probe_once(url) or self._probe_once(url)

    def _probe_once(self, url: str) -> bool:
        try:
            response = self._session.get(
                f"{url.rstrip('/')}/health", timeout=(PROBE_TIMEOUT_S, PROBE_TIMEOUT_S), allow_redirects=False
            )
            response.close()
            return 200 <= response.status_code < 300
        except requests.RequestException:
            return False

    def send_task(self, url: str, body: dict[str, Any], *, answer_timeout_s: float) -> PendingRun:
        """Connect and write the task; raise AgentUnreachable when that fails."""
        target = urlsplit(url)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise AgentUnreachable("worker url is not an http(s) URL")
        connection_class = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(target.hostname, target.port, timeout=CONNECT_TIMEOUT_S)
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._agent_key:
            headers[AGENT_HEADER] = self._agent_key
        try:
            connection.request("POST", f"{target.path.rstrip('/')}/execute-task", body=payload, headers=headers)
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise AgentUnreachable(_describe(error)) from None
        return PendingRun(connection, answer_timeout_s)


def _describe(error: BaseException) -> str:
    """The kind of failure, without addresses or headers."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, ConnectionError):
        return "connection lost"
    if isinstance(error, http.client.HTTPException):
        return f"bad HTTP answer ({type(error).__name__})"
    if isinstance(error, socket.gaierror):
        return "host not found"
    return f"network error ({type(error).__name__})"
