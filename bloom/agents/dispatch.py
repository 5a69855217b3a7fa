"""Push dispatch: queued tasks delivered to Membridge agents (README, "Running with a Membridge fleet").

A dispatch is a lease (the same statement, rules and atomicity as `lease`, limited to
workers with a url) followed by a delivery to `{url}/execute-task`. The agent answers
only when its run has ended, so every delivery runs on a thread of its own here: no
request thread and no database connection waits for a run. The route waits only
until the agent has taken the request or refused it.

- Refused (unreachable, 5xx, 503 without Claude CLI): the task goes back to the queue
  without spending an attempt, and the worker leaves the rotation (agents/liveness.py).
- Taken: the agent heartbeats and completes through the API itself. If its answer
  reports an outcome and its completion never arrived, the task is completed from the
  answer, fenced by the lease (once: a second completion is refused by complete_task).
- No answer (the connection broke mid-run): the worker is probed at once; a dead one
  leaves the rotation and its tasks are requeued.

Automatic dispatch runs in one process of the deployment at a time, the holder of the
'dispatch' leadership (bloom/leadership.py: a row with an expiry and an epoch, renewed
every 2 s; a killed, frozen or cut-off leader is replaced within about 12 s, and its
grants after that are refused by their epoch), woken by the queue's NOTIFY and by its
own runs ending; each task is delivered once however many processes and hosts there are,
because a task can be leased only once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .. import metrics
from ..bounds import DEFAULT_TIMEOUT_SEC
from ..db import Database
from ..errors import ApiError, Conflict, NotFound, Unavailable, is_transient
from ..leadership import RENEW_EVERY_S, Leadership, process_identity
from ..leases.service import LeaseService
from ..queue_events import QueueEvents
from ..records.service import RecordService
from ..stamps import now_ms
from .client import (
    ACCEPT_WINDOW_S,
    ANSWER_GRACE_S,
    CONNECT_TIMEOUT_S,
    QUICK_ANSWER_S,
    AgentAnswer,
    AgentClient,
    AgentUnreachable,
    PendingRun,
)
from .delivery_slots import DeliverySlots
from .liveness import take_workers_out
from .outliers import START_HEARTBEAT_S, RunOutcomes

log = logging.getLogger(__name__)

DISPATCH_ACTOR = "dispatcher"
# Where a delivery's callbacks arrive (see delivery_callback_url).
DELIVERY_PREFIX = "/api/runtime/deliveries"
LEADER_RETRY_S = 2.0  # how often a process that does not lead tries to take the leadership
CANDIDATES_PER_ROUND = 32
# How long an agent's answer is held while the database is away (see _complete_holding_on).
RESULT_HOLD_S = 300.0
# Deliveries (each a thread waiting for its agent's answer) in flight in this process:
# up to MAX_IN_FLIGHT for whoever comes, then fair shares between agents up to
# DELIVERY_HARD_LIMIT (bloom/agents/delivery_slots.py).
MAX_IN_FLIGHT = 256
DELIVERY_HARD_LIMIT = 320


@dataclass(frozen=True)
class DispatchOutcome:
    dispatched: bool
    task_id: str
    worker_id: str
    lease_id: str
    error: str | None = None

    def json(self) -> dict[str, Any]:
        body = {"dispatched": self.dispatched, "task_id": self.task_id, "worker_id": self.worker_id}
        if self.dispatched:
            body["lease_id"] = self.lease_id
        else:
            body["error"] = self.error
        return body


class _Delivery:
    """One task on its way to an agent; the route waits on `settled`."""

    def __init__(self, granted: dict[str, Any]) -> None:
        self.task = granted["task"]
        self.lease = granted["lease"]
        self.worker = granted["worker"]
        self.address: str = granted["address"]
        self.settled = threading.Event()
        self.never_started = False  # taken by the agent, no heartbeat within START_HEARTBEAT_S
        self.outcome: DispatchOutcome | None = None
        self.on_settled: Callable[[_Delivery], None] | None = None

    def settle(self, error: str | None = None) -> None:
        self.outcome = DispatchOutcome(
            error is None, self.task["id"], self.worker["id"], self.lease["id"], error
        )
        self.settled.set()
        if self.on_settled is not None:
            self.on_settled(self)


class Dispatcher:
    def __init__(
        self,
        leases: LeaseService,
        records: RecordService,
        database: Database,
        agents: AgentClient,
        events: QueueEvents,
        *,
        public_url: str | None,
        callback_key: str | None = None,
    ) -> None:
        self._leases = leases
        self._records = records
        self._db = database
        self._agents = agents
        self._events = events
        self._public_url = public_url
        self._callback_key = callback_key  # the workers' key, for _complete_elsewhere
        self._slots = DeliverySlots(MAX_IN_FLIGHT, DELIVERY_HARD_LIMIT)
        self._leadership = Leadership(database, "dispatch", process_identity())
        self._thread: threading.Thread | None = None
        # Shutdown: no grant after `_stopping`; a grant under way finishes first (`_granting`),
        # and deliveries not yet taken or refused (`_unsettled`) are waited for.
        self._stopping = threading.Event()
        self._granting = threading.Lock()
        self._unsettled: set[_Delivery] = set()
        self._unsettled_lock = threading.Lock()
        # Deliveries whose agent has the task, by lease id: when a lease ends because its
        # worker left the rotation (a failed probe: a hung or dead agent), anywhere in the
        # deployment, its connection is dropped at once instead of held for the run's timeout.
        self._in_flight: dict[str, PendingRun] = {}
        self._in_flight_lock = threading.Lock()
        self._outcomes = RunOutcomes(database)

    # The route --------------------------------------------------------------------

    def dispatch(self, task_id: str, *, worker_id: str | None, ttl_seconds: int | None) -> DispatchOutcome:
        """Lease the task to a push worker and deliver it; returns once the agent has
        taken the request or refused it."""
        if not self._public_url:
            raise Conflict("Dispatch is not configured: set BLOOM_PUBLIC_URL to the address agents call back")
        if self._stopping.is_set() or not self._slots.reserve():
            raise Unavailable("Too many dispatches in flight; try again later")
        try:
            granted = self._leases.grant_lease(task_id, worker_id=worker_id, ttl_seconds=ttl_seconds, push_only=True,
                                               full_addresses=self._slots.full_addresses())
        except Conflict:
            self._slots.release(None)
            earlier = self._current_delivery(task_id)
            if earlier is None:
                raise
            # Delivered already (the automatic dispatcher got there first): that delivery
            # is the answer, as a repeated request expects.
            return earlier
        except BaseException:
            self._slots.release(None)
            raise
        delivery = self._start(granted)
        delivery.settled.wait(CONNECT_TIMEOUT_S * 2 + ACCEPT_WINDOW_S + 1.0)
        if delivery.outcome is None:  # still connecting: it is on its way, the thread settles it
            return DispatchOutcome(True, granted["task"]["id"], granted["worker"]["id"], granted["lease"]["id"])
        return delivery.outcome

    def _current_delivery(self, task_id: str) -> DispatchOutcome | None:
        """The task's live delivery to an agent, if it has one."""
        with self._db.autocommit() as tx:
            row = tx.one_or_none("current_delivery", task_id=task_id)
        return None if row is None else DispatchOutcome(True, task_id, row["worker_id"], row["lease_id"])

    # Automatic dispatch -------------------------------------------------------------

    def start(self) -> None:
        """Run automatic dispatch in this process (when it holds the leadership)."""
        if self._thread is None and self._public_url:
            self._thread = threading.Thread(target=self._run_forever, name="bloom-dispatcher", daemon=True)
            self._thread.start()

    def _run_forever(self) -> None:
        failed_tries = 0  # an outage is said once when it starts and once when it ends
        while True:
            try:
                self._lead_while_possible()
            except Exception as error:  # the database went away: try again
                if not failed_tries:
                    log.warning("dispatcher: %s; retrying every %g s", type(error).__name__, LEADER_RETRY_S)
                failed_tries += 1
            else:
                if failed_tries:
                    log.warning("dispatcher: working again after %d failed tries", failed_tries)
                failed_tries = 0
            time.sleep(LEADER_RETRY_S)

    def _lead_while_possible(self) -> None:
        if self._stopping.is_set() or not self._leadership.take_or_renew():
            return
        log.info("dispatcher: this process dispatches queued tasks to push workers (leadership epoch %d)",
                 self._leadership.epoch)
        try:
            renewed_at = time.monotonic()
            while not self._stopping.is_set():
                seen = self._events.generation
                if self.dispatch_queued() < CANDIDATES_PER_ROUND:  # a full round: more may wait
                    self._events.wait_for_change(seen, RENEW_EVERY_S)
                if time.monotonic() - renewed_at >= RENEW_EVERY_S:
                    if not self._leadership.take_or_renew():
                        log.warning("dispatcher: leadership lost to another process; this one no longer dispatches")
                        return
                    renewed_at = time.monotonic()
        finally:
            try:
                self._leadership.release()
            except Exception as error:  # the database is away: the row expires by itself
                log.debug("dispatcher: leadership not released (%s)", type(error).__name__)

    def dispatch_queued(self) -> int:
        """Push queued tasks (in the queue's order: priority, then turn) to push workers
        with room; returns how many."""
        with self._db.autocommit() as tx:
            candidates = [row["id"] for row in tx.all("dispatch_candidates", limit=CANDIDATES_PER_ROUND, now=now_ms(),
                                                        max_running_per_key=self._leases.max_running_per_key)]
        started = 0
        for task_id in candidates:
            with self._granting:
                if self._stopping.is_set() or not self._slots.reserve():
                    break
                try:
                    epoch = self._leadership.epoch
                    granted = self._leases.grant_lease(
                        task_id, worker_id=None, ttl_seconds=None, push_only=True, actor=DISPATCH_ACTOR,
                        full_addresses=self._slots.full_addresses(),
                        leader=(self._leadership.holder, epoch) if epoch is not None else None,
                    )
                except (Conflict, NotFound):  # taken by a pull worker or another dispatcher meanwhile
                    self._slots.release(None)
                    continue
                except Unavailable:  # no push worker has room (or a fair share of slots left)
                    self._slots.release(None)
                    break
                except BaseException:
                    self._slots.release(None)
                    raise
                self._start(granted)
            started += 1
        return started

    def stop(self, *, timeout_s: float = CONNECT_TIMEOUT_S * 2 + ACCEPT_WINDOW_S + 1.0) -> None:
        """Before this process exits (a reload, a stop): grant nothing more, and wait until
        every task already granted has been taken by its agent or refused (and queued
        again). A lease granted here and never delivered would hold its task until the
        lease expired, and the run would wait for nothing. Runs the agents have taken go
        on without us: their callbacks reach whichever process serves next."""
        self._stopping.set()
        with self._granting:
            pass
        deadline = time.monotonic() + timeout_s
        with self._unsettled_lock:
            waiting = list(self._unsettled)
        for delivery in waiting:
            delivery.settled.wait(max(0.0, deadline - time.monotonic()))

    # One delivery -------------------------------------------------------------------

    def _forget(self, delivery: _Delivery) -> None:
        with self._unsettled_lock:
            self._unsettled.discard(delivery)

    def _start(self, granted: dict[str, Any]) -> _Delivery:
        delivery = _Delivery(granted)
        self._slots.assign(delivery.address)
        with self._unsettled_lock:
            self._unsettled.add(delivery)
        delivery.on_settled = self._forget
        threading.Thread(
            target=self._deliver, args=(delivery,), name=f"bloom-deliver-{delivery.task['id'][:8]}", daemon=True
        ).start()
        return delivery

    def _deliver(self, delivery: _Delivery) -> None:
        try:
            self._deliver_and_follow(delivery)
        except Exception:
            log.exception("dispatch of task %s failed unexpectedly", delivery.task["id"])
            if not delivery.settled.is_set():  # never taken: the task must not stay leased
                self._refused(delivery, AgentAnswer(None, None, "internal error"))
        finally:
            self._slots.release(delivery.address)
            self._events.poke()  # capacity may have freed up

    def _deliver_and_follow(self, delivery: _Delivery) -> None:
        task, worker = delivery.task, delivery.worker
        timeout_sec = int((task.get("policy") or {}).get("timeout_sec") or DEFAULT_TIMEOUT_SEC)
        try:
            run = self._agents.send_task(
                worker["url"], self._agent_body(task, delivery.lease["id"]),
                answer_timeout_s=timeout_sec + 10 + ANSWER_GRACE_S,
            )
        except AgentUnreachable as error:
            return self._refused(delivery, AgentAnswer(None, None, str(error)))
        with self._in_flight_lock:
            if not self._in_flight:
                self._events.on_leases_ended(self._abandon_deliveries)
            self._in_flight[delivery.lease["id"]] = run
        try:
            self._wait_for_the_run(delivery, run)
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(delivery.lease["id"], None)
            run.release()

    def _wait_for_the_run(self, delivery: _Delivery, run: PendingRun) -> None:
        task, worker = delivery.task, delivery.worker
        if run.answered_within(ACCEPT_WINDOW_S):
            answer = run.answer(within_s=QUICK_ANSWER_S)
            if not answer.ok:
                return self._refused(delivery, answer)
        else:
            answer = None
        delivery.settle()
        metrics.DISPATCHES.labels("dispatched").inc()
        log.info("task %s dispatched to worker %s", task["id"], worker["id"])
        if answer is None:
            # The agent heartbeats as each run starts: one that has not within
            # START_HEARTBEAT_S is not running the task (a trickled answer changes nothing).
            start_check = threading.Timer(START_HEARTBEAT_S, self._drop_unless_started, args=(delivery, run))
            start_check.daemon = True
            start_check.start()
            try:
                answer = run.answer()
            finally:
                start_check.cancel()
        if run.abandoned and not answer.ok:
            if delivery.never_started:
                self._leases.release_worker_leases(worker["id"], [delivery.lease["id"]], actor=DISPATCH_ACTOR)
                self._note_outcome(worker["id"], failed=True,
                                   why=f"took a task and said nothing of its run within {START_HEARTBEAT_S:g} s")
                log.warning("task %s: worker %s took it and never started it; queued again", task["id"], worker["id"])
            else:
                log.info("task %s: delivery to worker %s dropped: its lease ended (the worker left the rotation)",
                         task["id"], worker["id"])
            return
        self._follow_up(delivery, answer)

    def _drop_unless_started(self, delivery: _Delivery, run: PendingRun) -> None:
        try:
            with self._db.autocommit() as tx:
                started = tx.one("delivery_started", task_id=delivery.task["id"], lease_id=delivery.lease["id"])["started"]
        except Exception:  # the database is away: no evidence either way
            return
        if not started:
            delivery.never_started = True
            run.abandon()

    def _abandon_deliveries(self, lease_ids: set[str]) -> None:
        with self._in_flight_lock:
            runs = [run for lease_id, run in self._in_flight.items() if lease_id in lease_ids]
        for run in runs:
            run.abandon()

    def _agent_body(self, task: dict[str, Any], lease_id: str) -> dict[str, Any]:
        """What the agent gets. Its callbacks go to `{runtime_url}/api/runtime/llm-tasks/…`,
        so a runtime_url that names this delivery's lease fences them: a late callback of
        an agent whose task went elsewhere is refused (api/tasks.py, delivery routes)."""
        return {
            "task_id": task["id"],
            "prompt": task["prompt"],
            "context_id": task["context_id"],
            "agent_slug": task["agent_slug"],
            "desired_format": task["desired_format"],
            "context_hints": task["context_hints"],
            "policy": task["policy"],
            "runtime_url": delivery_callback_url(self._public_url or "", lease_id),
        }

    def _refused(self, delivery: _Delivery, answer: AgentAnswer) -> None:
        """The agent did not take the task: queue it again (no attempt spent), worker out."""
        reason = answer.describe() if answer.status is not None else f"agent unreachable: {answer.problem}"
        worker_id = delivery.worker["id"]
        take_workers_out(self._db, [worker_id], reason=f"dispatch refused: {reason}",
                         alive=answer.status is not None, claude_cli_missing=answer.says_no_cli)
        self._records.record_audit(
            "dispatch_failed", "task", delivery.task["id"],
            {"worker_id": worker_id, "lease_id": delivery.lease["id"], "error": reason}, actor=DISPATCH_ACTOR,
        )
        metrics.DISPATCHES.labels("refused").inc()
        log.warning("dispatch of task %s to worker %s refused: %s", delivery.task["id"], worker_id, reason)
        delivery.settle(reason)

    def _follow_up(self, delivery: _Delivery, answer: AgentAnswer) -> None:
        """After the run: complete from the answer if the agent's own completion never came."""
        task_id, worker = delivery.task["id"], delivery.worker
        if answer.timed_out:
            # It took the task and kept silent past the time it promised, whatever its
            # /health says: it gets nothing more until it registers again, and the task
            # goes elsewhere now (not after its lease, and not back to the same black hole).
            take_workers_out(self._db, [worker["id"]], until_registered=True,
                             reason="took a task and gave no answer within its timeout_sec + 10 s")
            return
        if answer.status is None:
            # The connection broke mid-run: the agent may have died. Ask it now.
            if not self._agents.probe(worker["url"]):
                take_workers_out(self._db, [worker["id"]], reason=f"lost during a run: {answer.problem}")
            return
        body = answer.body if isinstance(answer.body, dict) else {}
        succeeded = answer.ok and body.get("ok") is True and isinstance(body.get("output"), str)
        if succeeded:
            error_message = None
        elif answer.ok:
            error_message = answer.problem or _agent_error(body)
        else:
            error_message = answer.describe()
        completion = {
            "status": "success" if succeeded else "error",
            "output": body.get("output") if succeeded else None,
            "error_message": error_message,
            "metrics": {"duration_ms": _duration(body), "tokens_used": None},
            "artifact_type": "LLM_RESULT",
            "artifact_tags": [],
            "lease_id": delivery.lease["id"],
            "worker_id": worker["id"],
        }
        if self._complete_holding_on(task_id, completion):
            log.info("task %s completed from its agent's answer (no completion callback arrived)", task_id)
        self._note_outcome(worker["id"], failed=not succeeded, why=error_message or "")

    def _note_outcome(self, worker_id: str, *, failed: bool, why: str) -> None:
        try:
            self._outcomes.note(worker_id, failed=failed, why=why)
        except Exception as error:  # bookkeeping only: the task's own state is stored already
            log.warning("worker %s: its run's outcome could not be noted (%s)", worker_id, type(error).__name__)

    def _complete_elsewhere(self, task_id: str, completion: dict[str, Any]) -> bool | None:
        """This host cannot reach the database (cut off, or it is down for everyone): send
        the result where the agent sent its callback, the deployment's BLOOM_PUBLIC_URL (the
        load balancer), as that callback, so that a host that reaches the database stores
        it now rather than this one at the heal. True: stored there; False: refused (the
        task moved on); None: not now (no other host answered), hold on."""
        if not self._public_url:
            return None
        url = f"{delivery_callback_url(self._public_url, completion['lease_id'])}/api/runtime/llm-tasks/" \
              f"{quote(task_id, safe='')}/complete"
        headers = {"X-Runtime-API-Key": self._callback_key} if self._callback_key else {}
        try:
            answer = requests.post(url, json=completion, headers=headers, timeout=5)
        except requests.RequestException:
            return None
        if answer.status_code == 200:
            log.info("task %s: the agent's result, held while this host could not reach the database, "
                     "was stored by another host", task_id)
            return True
        return False if answer.status_code in (404, 409) else None

    def _complete_holding_on(self, task_id: str, completion: dict[str, Any]) -> bool:
        """Store the agent's answer as the task's completion. While the database is away
        (its callback got 503 too, and agents never retry), hold the answer and try again,
        with backoff, for up to RESULT_HOLD_S: a short outage loses no result. Fenced by the
        lease, so at most once."""
        deadline = time.monotonic() + RESULT_HOLD_S
        wait = 0.5
        while True:
            try:
                self._leases.complete_task(task_id, completion, actor=DISPATCH_ACTOR)
                return True
            except (Conflict, NotFound):
                return False  # the agent's own completion came first (the usual case), or the task moved on
            except (Unavailable, DBAPIError, PoolTimeoutError) as error:
                if isinstance(error, DBAPIError) and not is_transient(error):
                    log.warning("task %s: the agent's result was refused by the database: %s",
                                task_id, getattr(error.orig, "pgcode", None))
                    return False
                handed = self._complete_elsewhere(task_id, completion)
                if handed is not None:
                    return handed
                if self._stopping.is_set() or time.monotonic() + wait > deadline:
                    log.warning("task %s: the agent's result could not be stored (%s); its lease will expire",
                                task_id, type(error).__name__)
                    return False
                time.sleep(wait)
                wait = min(wait * 2, 10.0)
            except ApiError as error:
                log.warning("task %s: could not complete from the agent's answer: %s", task_id, error)
                return False


def delivery_callback_url(public_url: str, lease_id: str) -> str:
    """The runtime_url of one delivery: the agent appends /api/runtime/llm-tasks/<id>/…"""
    return f"{public_url}{DELIVERY_PREFIX}/{quote(lease_id, safe='')}"


def _agent_error(body: dict[str, Any]) -> str:
    for key in ("error", "error_message", "detail", "output"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value[-8000:]
    return "the agent reported a failed run"


def _duration(body: dict[str, Any]) -> int:
    value = body.get("duration_ms")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

