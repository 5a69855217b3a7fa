"""Result artifacts in a real S3 server (SeaweedFS), with the database as fallback."""
from __future__ import annotations

import json
import re
import socket
import uuid

import pytest
import requests
from minio import Minio

from bloom import create_app

from .conftest import make_settings
from .helpers import create_task, lease, register_worker


@pytest.fixture
def app(s3_app):
    return s3_app


def s3_client(s3) -> Minio:
    return Minio(f"127.0.0.1:{s3.port}", access_key=s3.ACCESS_KEY, secret_key=s3.SECRET_KEY, secure=False, region="us-east-1")


def objects_of(s3, bucket, task_id):
    client = s3_client(s3)
    if not client.bucket_exists(bucket):
        return []
    return [o.object_name for o in client.list_objects(bucket, prefix=f"artifacts/{task_id}/", recursive=True)]


def finish(client, output, **task_fields):
    register_worker(client, f"w-{uuid.uuid4().hex[:6]}")
    task = create_task(client, **task_fields)
    assert lease(client, task["id"]).status_code == 201
    body = {"status": "success", "output": output, "metrics": {"duration_ms": 5}}
    response = client.post(
        f"/api/runtime/llm-tasks/{task['id']}/complete",
        data=json.dumps(body, ensure_ascii=False).encode(),  # several MiB of UTF-8 as a worker sends it
        content_type="application/json",
    )
    assert response.status_code == 200, response.get_json()
    return task, response.get_json()["artifact"]


def test_output_is_uploaded_and_the_artifact_points_at_it(client, s3, bucket):
    task, artifact = finish(client, "The summary.")
    assert artifact["content"] is None
    match = re.fullmatch(rf"minio://{bucket}/(artifacts/{task['id']}/(\d+)\.json)", artifact["url"])
    assert match, artifact["url"]
    assert objects_of(s3, bucket, task["id"]) == [match.group(1)]
    assert s3_client(s3).get_object(bucket, match.group(1)).read() == b"The summary."


def test_an_object_stored_output_reads_back_through_both_routes_and_a_presigned_url(client):
    task, artifact = finish(client, '{"answer": 42}', desired_format="json")
    shown = client.get(f"/api/runtime/artifacts/{artifact['id']}")
    assert shown.status_code == 200
    body = shown.get_json()
    assert body["url"] == artifact["url"]
    content = client.get(f"/api/runtime/artifacts/{artifact['id']}/content")
    assert content.status_code == 200
    assert content.mimetype == "application/json"
    assert content.get_data() == b'{"answer": 42}'
    downloaded = requests.get(body["download_url"], timeout=10)
    assert downloaded.status_code == 200 and downloaded.content == b'{"answer": 42}'


@pytest.mark.parametrize("output", ["é" * (3 * 1024 * 1024), "Zusammenfassung: 日本語のテキスト — ✓ 🚀\nzweite Zeile"])
def test_large_and_non_ascii_outputs_round_trip_intact(client, output):
    _, artifact = finish(client, output)
    assert artifact["url"] is not None
    content = client.get(f"/api/runtime/artifacts/{artifact['id']}/content")
    assert content.mimetype == "text/plain"
    assert content.get_data().decode("utf-8") == output


def dead_endpoint():
    """A port that accepts connections and never answers: worse than a refused one."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


@pytest.mark.parametrize("failure", ["down", "silent", "bad-credentials"])
def test_when_the_store_fails_the_output_stays_in_the_database(database_url, s3, bucket, failure, caplog):
    listener = dead_endpoint()
    overrides = {
        "down": {"MINIO_PORT": "9"},
        "silent": {"MINIO_PORT": str(listener.getsockname()[1])},
        "bad-credentials": {"MINIO_SECRET_KEY": "not-the-secret"},
    }[failure]
    app = create_app(make_settings(database_url, **s3.env(bucket, **overrides)))
    client = app.test_client()
    task, artifact = finish(client, "kept safe")
    listener.close()
    assert (artifact["url"], artifact["content"]) == (None, "kept safe")
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "completed"
    assert client.get(f"/api/runtime/artifacts/{artifact['id']}/content").get_data() == b"kept safe"
    assert "keeping the output in the database" in caplog.text
    assert s3.SECRET_KEY not in caplog.text


def test_a_refused_completion_leaves_no_orphan_object(client, s3, bucket):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"])
    finish(client, "makes the bucket exist")
    refused = client.post(
        f"/api/runtime/llm-tasks/{task['id']}/complete",
        json={"status": "success", "output": "late", "metrics": {"duration_ms": 1}, "lease_id": "not-mine"},
    )
    assert refused.status_code == 409
    assert objects_of(s3, bucket, task["id"]) == []


def test_content_is_502_json_when_the_store_is_down(client, database_url, s3, bucket):
    _, artifact = finish(client, "in the bucket")
    same_db_dead_store = create_app(make_settings(database_url, **s3.env(bucket, MINIO_PORT="9")))
    response = same_db_dead_store.test_client().get(f"/api/runtime/artifacts/{artifact['id']}/content")
    assert response.status_code == 502
    assert "Object store unavailable" in response.get_json()["error"]


def test_unknown_artifact_is_404(client):
    for path in ("/api/runtime/artifacts/nope", "/api/runtime/artifacts/nope/content"):
        response = client.get(path)
        assert (response.status_code, response.get_json()) == (404, {"error": "Artifact not found"})


def test_without_an_object_store_the_output_is_in_the_row_and_readable(database_url):
    client = create_app(make_settings(database_url)).test_client()
    _, artifact = finish(client, "row stored")
    assert artifact["url"] is None
    shown = client.get(f"/api/runtime/artifacts/{artifact['id']}").get_json()
    assert shown["content"] == "row stored" and "download_url" not in shown
    assert client.get(f"/api/runtime/artifacts/{artifact['id']}/content").get_data() == b"row stored"
