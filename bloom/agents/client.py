"""Client of the Membridge agents, the nodes that run pushed tasks (README, "Running with a Membridge fleet").

Two calls: a health probe (`GET {url}/health`, bounded in all) and the delivery of a task
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
import ipaddress
import json
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..large_bodies import LargeBodies

AGENT_HEADER = "X-MEMBRIDGE-AGENT"
CONNECT_TIMEOUT_S = 2.0
# One probe try, all told. A live agent that answers its /health in 2.5 s is alive.
PROBE_DEADLINE_S = 3.0
PROBE_TRIES = 2
PROBE_READ_BYTES = 4096
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})[ \r]")
# A refusal comes at once; an agent still silent after this has taken the request.
ACCEPT_WINDOW_S = 0.5
# An answer that starts within the accept window (a refusal, or a very short run) must be
# complete this soon: a trickle does not hold a delivery slot.
QUICK_ANSWER_S = 3.0
# What of an agent's (or any target's) error text is repeated: one short line.
REASON_CHARS = 120
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
# Beyond the timeout_sec + 10 s the agent promises, before we stop waiting for its answer.
ANSWER_GRACE_S = 5.0
# An operation's answer (health, self-update, restart, clone): a few hundred bytes.
OPERATION_ANSWER_BYTES = 1 << 20


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
    def timed_out(self) -> bool:
        """No answer by the time the agent promised one (its run's time + 10 s, and our grace)."""
        return self.status is None and self.problem == "timed out"

    @property
    def says_no_cli(self) -> bool:
        """The agent's 503 "Claude CLI is not installed on this node": it cannot run anything."""
        detail = self.body.get("detail") if isinstance(self.body, dict) else self.body
        return self.status == 503 and isinstance(detail, str) and "cli" in detail.lower()

    def describe(self) -> str:
        """The status and a short reason, one line: never more of a target's body (a
        registered url may point anywhere, and this text reaches API callers)."""
        if self.status is None:
            return f"agent gave no answer: {self.problem}"
        if isinstance(self.body, dict):
            for key in ("detail", "error", "error_message"):
                if isinstance(self.body.get(key), str):
                    reason = " ".join(_UNPRINTABLE.sub(" ", self.body[key]).split())[:REASON_CHARS]
                    return f"agent answered {self.status}: {reason}"
        return f"agent answered {self.status}"


class PendingRun:
    """A delivered task whose agent has not answered yet; owns its connection."""

    def __init__(self, connection: http.client.HTTPConnection, answer_timeout_s: float, *,
                 max_bytes: int, large_bodies: LargeBodies | None = None) -> None:
        self._connection = connection
        self._answer_timeout_s = answer_timeout_s
        self._max_bytes = max_bytes
        self._large_bodies = large_bodies
        self._holds_large_body = False
        self.abandoned = False

    def release(self) -> None:
        """Done with the answer: a large one's slot and memory go back (call it once the
        answer, and what was made of it, are no longer needed)."""
        if self._holds_large_body and self._large_bodies is not None:
            self._holds_large_body = False
            self._large_bodies.give_back()
            LargeBodies.hand_memory_back()

    def abandon(self) -> None:
        """Drop the connection now (from any thread): the run is no longer awaited."""
        self.abandoned = True
        _cut(self._connection.sock)

    def answered_within(self, seconds: float) -> bool:
        """True when the agent has started to answer within `seconds` (a refusal, or a very short run)."""
        sock = self._connection.sock
        if sock is None:
            return True  # closed already: answer() says how
        readable, _, _ = select.select([sock], [], [], seconds)
        return bool(readable)

    def answer(self, within_s: float | None = None) -> AgentAnswer:
        """Wait for the end of the run, then close the connection. The wait is bounded in
        all (`within_s`, else the run's promised time): an agent that trickles its answer
        a byte at a time is cut off at the deadline like a silent one."""
        deadline_s = within_s if within_s is not None else self._answer_timeout_s
        sock = self._connection.sock
        cutoff = threading.Timer(deadline_s, _cut, args=(sock,))
        cutoff.daemon = True
        cutoff.start()
        started = time.monotonic()
        try:
            if sock is not None:
                sock.settimeout(deadline_s)
            response = self._connection.getresponse()
            raw = self._read_body(response, started + deadline_s)
            if raw is None:
                return AgentAnswer(response.status, None, self._too_large())
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw[:500].decode("utf-8", errors="replace")
            return AgentAnswer(response.status, body)
        except _NoRoom:
            return AgentAnswer(None, None, "no memory free for its answer in time")
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() - started >= deadline_s - 0.05:
                return AgentAnswer(None, None, "timed out")
            return AgentAnswer(None, None, _describe(error))
        finally:
            cutoff.cancel()
            self._connection.close()

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes | None:
        """The answer's body, or None when it is over max_bytes (then not read further).
        A body over LargeBodies.LARGE_BODY_BYTES, or of unknown length, is read only with
        one of the process's large-body slots, shared with requests' bodies."""
        length = response.length
        if length is not None and length > self._max_bytes:
            return None
        if self._large_bodies is not None and (length is None or length > LargeBodies.LARGE_BODY_BYTES):
            if not self._large_bodies.take(timeout=max(0.0, deadline - time.monotonic())):
                raise _NoRoom()
            self._holds_large_body = True
        raw = response.read(self._max_bytes + 1)
        return None if len(raw) > self._max_bytes else raw

    def _too_large(self) -> str:
        return (f"its answer is larger than BLOOM_MAX_BODY_BYTES ({self._max_bytes} bytes), "
                "the most a completion may carry: not kept")


class _NoRoom(Exception):
    """No large-body slot came free before the answer's deadline."""


class AddressNotAllowed(Exception):
    """The url's host is, or resolves to, an address outside BLOOM_AGENT_NETWORKS."""


class AgentNetworks:
    """Where agent urls may point (BLOOM_AGENT_NETWORKS). The runtime sends the agent key
    and prompts to an agent's url, and probes it: a url that leads anywhere else (the
    internet, cloud metadata, another tenant) is neither registered nor ever called."""

    def __init__(self, networks) -> None:
        self._networks = tuple(networks)

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip.version == network.version and ip in network for network in self._networks)

    def literal_outside(self, url: str) -> bool:
        """True when the url's host is an IP address outside the networks (a name is
        checked when it is resolved, at each call: resolve_allowed)."""
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return not self.allows(host)

    def resolve_allowed(self, host: str, port: int, timeout_s: float) -> tuple:
        """The first address of `host` to connect to; every address it resolves to must
        be inside the networks (a name that also points outside is refused whole)."""
        infos = _resolve(host, port, timeout_s)
        if not infos:
            raise AddressNotAllowed("host not found")
        for info in infos:
            if not self.allows(info[4][0]):
                raise AddressNotAllowed("address not allowed (BLOOM_AGENT_NETWORKS)")
        return infos[0]


def _resolve(host: str, port: int, timeout_s: float) -> list:
    """getaddrinfo, bounded: a slow resolver must not hold a probe past its deadline."""
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError:
        pass
    result: list = []

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError:
            pass

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return list(result)


def _connect(info: tuple, timeout_s: float) -> socket.socket:
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    sock.settimeout(timeout_s)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


# How long the health check right before a delivery may take, all told. An agent on the
# network answers in milliseconds; one that does not answer within a second is not sent
# a task (its run would wait in its socket: see AgentClient.send_task).
PRE_DELIVERY_CHECK_S = 1.0


class AgentClient:
    def __init__(self, agent_key: str, networks: AgentNetworks, *, max_answer_bytes: int = OPERATION_ANSWER_BYTES,
                 large_bodies: LargeBodies | None = None) -> None:
        """A delivery's answer is held to `max_answer_bytes` (the service passes its
        BLOOM_MAX_BODY_BYTES: an answer stands for a completion), read with the process's
        `large_bodies` slots when large."""
        self._agent_key = agent_key
        self.networks = networks
        self._max_answer_bytes = max_answer_bytes
        self._large_bodies = large_bodies

    def probe(self, url: str) -> bool:
        """Does the agent's /health answer 2xx, each try within PROBE_DEADLINE_S all told?
        Asked twice before the answer is no: one lost packet or busy moment must not send
        its runs elsewhere. A slow answer (within the deadline) is an answer."""
        return any(self._probe_once(url) for _ in range(PROBE_TRIES))

    def _probe_once(self, url: str) -> bool:
        status = status_line_of(url, "/health", deadline_s=PROBE_DEADLINE_S, networks=self.networks)
        return status is not None and 200 <= status < 300

    def send_task(self, url: str, body: dict[str, Any], *, answer_timeout_s: float) -> PendingRun:
        """Check that the agent answers now, then connect and write the task; raise
        AgentUnreachable when either fails.

        A request written to a hung agent (SIGSTOPped, a frozen VM) waits in its socket and
        is read when it wakes, even after the runtime has closed the connection and run
        the task elsewhere: a second LLM run. So no task goes to an agent whose /health
        does not answer within PRE_DELIVERY_CHECK_S, right before the delivery. What is
        left: a freeze between that check and the delivery, or after the run started."""
        self.checked_address(url)  # an address outside the agent networks: say so, not "no answer"
        status = status_line_of(url, "/health", deadline_s=PRE_DELIVERY_CHECK_S, networks=self.networks)
        if status is None:
            raise AgentUnreachable(f"no answer to its health check within {PRE_DELIVERY_CHECK_S:g} s")
        if not 200 <= status < 300:
            raise AgentUnreachable(f"its health check answered {status}")
        return self.send(url, "POST", "/execute-task", body, answer_timeout_s=answer_timeout_s,
                         max_answer_bytes=self._max_answer_bytes, large_bodies=self._large_bodies)

    def call(self, url: str, method: str, path: str, body: Any = None, *, within_s: float) -> AgentAnswer:
        """One request to an agent's own API (an operation: health, self-update, restart,
        uninstall, clone), its whole answer awaited at most `within_s`."""
        try:
            pending = self.send(url, method, path, body, answer_timeout_s=within_s)
        except AgentUnreachable as error:
            return AgentAnswer(None, None, str(error))
        return pending.answer()

    def send(self, url: str, method: str, path: str, body: Any = None, *, answer_timeout_s: float,
             max_answer_bytes: int = OPERATION_ANSWER_BYTES, large_bodies: LargeBodies | None = None) -> PendingRun:
        """Connect to the agent and write the request (the url checked against the agent
        networks first); raise AgentUnreachable when that fails."""
        target = urlsplit(url)
        host, port, checked = self.checked_address(url)
        connection: http.client.HTTPConnection
        if target.scheme == "https":  # by name, for the certificate
            connection = http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT_S)
        else:  # to the very address that was checked
            connection = http.client.HTTPConnection(checked[4][0], checked[4][1], timeout=CONNECT_TIMEOUT_S)
        payload = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Accept": "application/json", "Host": target.netloc}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self._agent_key:
            headers[AGENT_HEADER] = self._agent_key
        try:
            connection.request(method, f"{target.path.rstrip('/')}{path}", body=payload, headers=headers)
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise AgentUnreachable(_describe(error)) from None
        return PendingRun(connection, answer_timeout_s, max_bytes=max_answer_bytes, large_bodies=large_bodies)

    def checked_address(self, url: str) -> tuple[str, int, Any]:
        """(host, port, the address to connect to) of an agent url, checked against the
        agent networks here, at each call: a name may point elsewhere since it was
        registered. AgentUnreachable says why not."""
        target = urlsplit(url)
        try:
            host, port = target.hostname, target.port
        except ValueError:  # a port out of range
            raise AgentUnreachable("worker url has an invalid port") from None
        if target.scheme not in ("http", "https") or not host:
            raise AgentUnreachable("worker url is not an http(s) URL")
        port = port or (443 if target.scheme == "https" else 80)
        try:
            return host, port, self.networks.resolve_allowed(host, port, CONNECT_TIMEOUT_S)
        except AddressNotAllowed as refused:
            raise AgentUnreachable(str(refused)) from None


def _cut(sock: socket.socket | None) -> None:
    """End a read that outlived its deadline (the reading thread then fails at once)."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def status_line_of(url: str, path: str, *, deadline_s: float, networks: AgentNetworks) -> int | None:
    """The HTTP status of `GET {url}{path}`, or None when there is none within `deadline_s`
    in all (connect, TLS, send and every read together) or the answer is not HTTP.

    Only the status line is read, at most PROBE_READ_BYTES: an agent that trickles its
    answer a byte a second, or answers with a huge body, costs one bounded probe."""
    deadline = time.monotonic() + deadline_s
    target = urlsplit(url)
    try:
        host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    except ValueError:
        return None
    if target.scheme not in ("http", "https") or not host:
        return None
    request_path = f"{target.path.rstrip('/')}{path}"
    try:
        checked = networks.resolve_allowed(host, port, _left(deadline))
        with _connect(checked, _left(deadline)) as raw:
            sock = raw
            if target.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
            sock.settimeout(_left(deadline))
            sock.sendall(f"GET {request_path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
                         f"Accept: application/json\r\nConnection: close\r\n\r\n".encode("ascii", "replace"))
            received = b""
            while b"\r\n" not in received and len(received) < PROBE_READ_BYTES:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(PROBE_READ_BYTES - len(received))
                if not chunk:
                    break
                received += chunk
    except (OSError, ValueError, AddressNotAllowed):
        return None
    match = _STATUS_LINE.match(received)
    return int(match.group(1)) if match else None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


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
