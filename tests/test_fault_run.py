"""A short fault run (tests/fault_run.py): gunicorn processes SIGKILLed every few seconds and
PostgreSQL stopped at once and started again, while clients create tasks and a fleet of
push agents and pull workers runs them. The long run and its figures: docs/FAULTS.md."""
from __future__ import annotations

import pytest

from . import fault_run

pytestmark = pytest.mark.slow  # every test here starts servers or processes of its own


def test_under_kills_and_a_database_crash_every_acknowledged_task_completes_once_and_nothing_runs_twice_at_once():
    outcome = fault_run.run(25.0, kill_every_s=4.0, database_stops=1, drain_s=150.0, seed=3)
    assert outcome.worker_kills >= 4 and outcome.database_stops == 1
    assert outcome.acknowledged > 500
    assert outcome.failures() == [], outcome.summary()
