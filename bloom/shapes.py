"""Rows as the API's JSON objects (SPEC §3): exact field names, epoch milliseconds."""
from __future__ import annotations

from typing import Any

DEFAULT_CAPABILITIES = {"claude_cli": True, "max_concurrency": 1, "labels": []}


def capabilities_json(stored: Any) -> dict[str, Any]:
    stored = stored if isinstance(stored, dict) else {}
    return {
        "claude_cli": stored.get("claude_cli", True),
        "max_concurrency": stored.get("max_concurrency", 1),
        "labels": stored.get("labels", []),
    }


def worker_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "node_id": row.get("node_id"),
        "url": row.get("url"),
        "status": row["status"],
        "capabilities": capabilities_json(row.get("capabilities")),
        "last_heartbeat": row.get("last_heartbeat"),
        "ip_addrs": row.get("ip_addrs") or [],
        "obs_count": row.get("obs_count") or 0,
        "db_sha": row.get("db_sha"),
        "registered_at": row.get("registered_at"),
        "active_leases": int(row.get("active_leases") or 0),
        "agent_version": row.get("agent_version"),
        "os_info": row.get("os_info"),
        "install_method": row.get("install_method"),
    }


def task_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "context_id": row["context_id"],
        "agent_slug": row["agent_slug"],
        "prompt": row["prompt"],
        "context_hints": row.get("context_hints") or [],
        "policy": row.get("policy") or {"timeout_sec": 120, "budget": 0},
        "desired_format": row["desired_format"],
        "status": row["status"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "lease_id": row.get("lease_id"),
        "worker_id": row.get("worker_id"),
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "priority": row.get("priority", 0),
        "run_at": row.get("run_at"),
        "retry_at": row.get("retry_at"),
    }


def lease_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "task_id": row["task_id"],
        "worker_id": row["worker_id"],
        "started_at": row["started_at"],
        "expires_at": row["expires_at"],
        "ttl_seconds": row["ttl_seconds"],
        "status": row["status"],
        "last_heartbeat": row["last_heartbeat"],
        "context_id": row.get("context_id"),
    }


def artifact_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "task_id": row["task_id"],
        "job_id": row.get("job_id"),
        "type": row["type"],
        "created_at": row["created_at"],
        "finalized": bool(row.get("finalized")),
        "url": row.get("url"),
        "entity_refs": row.get("entity_refs") or [],
        "tags": row.get("tags") or [],
        "content": row.get("content"),
    }


def result_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "task_id": row["task_id"],
        "worker_id": row.get("worker_id"),
        "artifact_id": row.get("artifact_id"),
        "status": row["status"],
        "output": row.get("output"),
        "error_message": row.get("error_message"),
        "metrics": row.get("metrics") or {},
        "completed_at": row["completed_at"],
    }


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "timestamp": row["timestamp"],
        "action": row["action"],
        "entity_type": row["entity_type"],
        "entity_id": row.get("entity_id"),
        "actor": row.get("actor"),
        "detail": row.get("detail"),
    }
