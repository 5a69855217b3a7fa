"""What create_app builds once per process, reached through one typed object.

`services()` (in a request) or `services(app)` gives the process's Services: the
settings, the database, and the service of each area of the domain. The web layer keeps
its own state (the limiter, the large-body gate) under its own keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from .agents.client import AgentClient
    from .agents.dispatch import Dispatcher
    from .agents.operations import AgentOperations
    from .db import Database
    from .leases.service import LeaseService
    from .membridge.client import MembridgeClient
    from .membridge.settings import MembridgeSettingsStore
    from .projects.service import ProjectService
    from .queue_events import QueueEvents, WaitingRoom
    from .records.service import RecordService
    from .settings import Settings
    from .tasks.service import TaskService
    from .workers.service import WorkerService

EXTENSION_KEY = "bloom"


@dataclass
class Services:
    settings: Settings
    database: Database
    queue_events: QueueEvents
    waiting_room: WaitingRoom  # this process's room for long-polling claims
    tasks: TaskService
    leases: LeaseService
    workers: WorkerService
    records: RecordService
    projects: ProjectService
    agents: AgentClient  # the HTTP client of push delivery
    agent_ops: AgentOperations
    dispatcher: Dispatcher
    membridge_settings: MembridgeSettingsStore
    membridge: MembridgeClient
    scheduler: BackgroundScheduler | None = None  # a serving process's background jobs
    openapi_document: dict[str, Any] | None = None  # built on first request of it


def services(app: Flask | None = None) -> Services:
    return (app or current_app).extensions[EXTENSION_KEY]
