"""Managed projects as the web client's Membridge page uses them: create, list, clone to a
node through its agent, propagate to every node, sync memory through Membridge, delete.
Real sockets: stand-in agents and a stand-in control plane."""
from __future__ import annotations

import hashlib

import pytest

from bloom import create_app
from bloom.services import services

from .conftest import make_settings
from .fake_agent import AGENT_KEY
from .fake_membridge import ADMIN_KEY
from .helpers import audit_actions


@pytest.fixture
def app(database_url, membridge):
    app = create_app(make_settings(database_url, MEMBRIDGE_AGENT_KEY=AGENT_KEY, MEMBRIDGE_SERVER_URL=membridge.url,
                                   MEMBRIDGE_ADMIN_KEY=ADMIN_KEY))
    yield app
    services(app).database.dispose()


def _node(client, agents, name, **options):
    agent = agents(name, **options)
    assert client.post("/api/runtime/workers", json={"name": name, "url": agent.url}).status_code == 201
    return agent


def test_a_project_is_created_cloned_to_its_primary_node_and_deleted(client, agents):
    primary = _node(client, agents, "node-a")
    body = {"name": "garden-seedling", "repo_url": "https://example.org/garden.git", "target_path": "~/projects/garden",
            "primary_node_id": "node-a"}
    created = client.post("/api/runtime/projects", json=body)
    assert created.status_code == 201
    project = created.get_json()
    assert (project["clone_status"], project["canonical_id"]) == (
        "pending", hashlib.sha256(b"garden-seedling").hexdigest()[:16])
    assert client.post("/api/runtime/projects", json=body).status_code == 409
    assert [p["id"] for p in client.get("/api/runtime/projects").get_json()] == [project["id"]]

    cloned = client.post(f"/api/runtime/projects/{project['id']}/clone", json={})  # the client sends {}
    assert cloned.status_code == 200, cloned.get_json()
    answer = cloned.get_json()
    assert answer["status"] == "cloned" and answer["node"]["node_id"] == "node-a"
    assert answer["node"]["repo_path"] == "/home/agent/projects/garden-seedling" and answer["node"]["last_sync_at"]
    assert primary.state.operations == [("/clone", {"repo_url": "https://example.org/garden.git",
                                                    "project_name": "garden-seedling",
                                                    "target_path": "~/projects/garden"})]
    detail = client.get(f"/api/runtime/projects/{project['id']}").get_json()
    assert detail["clone_status"] == "cloned" and [n["clone_status"] for n in detail["nodes"]] == ["cloned"]
    assert client.get(f"/api/runtime/projects/{project['id']}/node-status").get_json() == detail["nodes"]

    removed = client.delete(f"/api/runtime/projects/{project['id']}")
    assert removed.get_json() == {"removed": True, "id": project["id"]}
    assert client.get(f"/api/runtime/projects/{project['id']}").get_json() == {"error": "Project not found"}
    assert {"project_created", "project_cloned", "project_deleted"} <= set(audit_actions(client))


def test_bad_projects_and_clones_are_refused_before_any_agent_is_called(client, agents):
    node = _node(client, agents, "node-a")
    for bad in ({"name": "a/b", "repo_url": "https://x.org/r.git"},
                {"name": "ok", "repo_url": "file:///etc/passwd"},
                {"name": "ok", "repo_url": "https://x.org/r.git", "target_path": "../../etc"},
                {"name": "", "repo_url": "https://x.org/r.git"},
                # A name that names a directory, an absolute path or another user's home, and
                # the cloud metadata address in any spelling a resolver takes:
                {"name": "..", "repo_url": "https://x.org/r.git"},
                {"name": "ok", "repo_url": "https://x.org/r.git", "target_path": "/etc/cron.d"},
                {"name": "ok", "repo_url": "https://x.org/r.git", "target_path": "~root/.ssh"},
                {"name": "ok", "repo_url": "http://169.254.169.254/latest/meta-data"},
                {"name": "ok", "repo_url": "http://2852039166/latest/meta-data"},
                {"name": "ok", "repo_url": "git@169.254.169.254:r.git"},
                {"name": "ok", "repo_url": "http://[fe80::a9fe:a9fe]/r.git"}):
        assert client.post("/api/runtime/projects", json=bad).status_code == 400, bad
    spaced = client.post("/api/runtime/projects", json={"name": "My Notes", "repo_url": "git@x.org:r.git"}).get_json()
    no_node = client.post(f"/api/runtime/projects/{spaced['id']}/clone", json={})
    assert no_node.status_code == 400 and "primary_node_id" in no_node.get_json()["error"]
    not_for_agent = client.post(f"/api/runtime/projects/{spaced['id']}/clone", json={"node_id": "node-a"})
    assert not_for_agent.status_code == 400 and "letters, digits" in not_for_agent.get_json()["error"]
    plain = client.post("/api/runtime/projects", json={"name": "notes", "repo_url": "git@x.org:r.git"}).get_json()
    assert client.post(f"/api/runtime/projects/{plain['id']}/clone", json={"node_id": "ghost"}).status_code == 404
    assert node.state.operations == []


def test_propagate_clones_to_every_node_that_lacks_it_and_says_which_failed(client, agents):
    _node(client, agents, "node-a")
    _node(client, agents, "node-b")
    broken = _node(client, agents, "node-c")
    broken.state.operations_fail = True
    client.post("/api/runtime/workers", json={"name": "pull-only"})  # no url: not a clone target
    project = client.post("/api/runtime/projects", json={"name": "garden", "repo_url": "https://x.org/g.git",
                                                         "primary_node_id": "node-a"}).get_json()
    client.post(f"/api/runtime/projects/{project['id']}/clone", json={})
    first = client.post(f"/api/runtime/projects/{project['id']}/propagate", json={}).get_json()
    assert first["status"] == "partial"
    by_node = {r["node_id"]: r for r in first["results"]}
    assert set(by_node) == {"node-b", "node-c"}  # node-a holds it already
    assert by_node["node-b"]["status"] == "cloned" and by_node["node-c"]["status"] == "failed"
    assert by_node["node-c"]["error"].startswith("agent answered 500")
    assert client.get(f"/api/runtime/projects/{project['id']}").get_json()["clone_status"] == "failed"
    broken.state.operations_fail = False
    second = client.post(f"/api/runtime/projects/{project['id']}/propagate", json={}).get_json()
    assert second == {"status": "synced", "results": [{"node_id": "node-c", "status": "cloned"}]}
    third = client.post(f"/api/runtime/projects/{project['id']}/propagate", json={}).get_json()
    assert third["status"] == "nothing_to_propagate"
    assert client.get(f"/api/runtime/projects/{project['id']}").get_json()["clone_status"] == "synced"


def test_memory_sync_goes_through_membridge_with_the_fields_it_takes(client, agents, membridge):
    membridge.add_agent("node-a", None)
    project = client.post("/api/runtime/projects", json={"name": "garden", "repo_url": "https://x.org/g.git",
                                                         "primary_node_id": "node-a"}).get_json()
    synced = client.post(f"/api/runtime/projects/{project['id']}/sync-memory", json={"direction": "pull"})
    assert synced.status_code == 200, synced.get_json()
    answer = synced.get_json()
    assert (answer["status"], answer["direction"], answer["node"]) == ("ok", "pull", "node-a")
    assert answer["result"]["ok"] is True and answer["result"]["job_id"]
    sent = [r for r in membridge.state.received if r.path == "/sync/pull"]
    assert sent[-1].body == {"project": "garden", "agent": "node-a"}
    assert sent[-1].headers.get("X-MEMBRIDGE-ADMIN") == ADMIN_KEY
    assert client.post(f"/api/runtime/projects/{project['id']}/sync-memory", json={}).status_code == 200  # push
    unknown = client.post(f"/api/runtime/projects/{project['id']}/sync-memory", json={"node_id": "nobody"})
    assert unknown.status_code == 404 and "nobody" in unknown.get_json()["error"]
    assert client.post(f"/api/runtime/projects/{project['id']}/sync-memory",
                       json={"direction": "../agents"}).status_code == 400
    assert {"memory_sync_pull", "memory_sync_push"} <= set(audit_actions(client))
    assert client.get("/api/runtime/health").get_json()["membridge"]["consecutiveFailures"] == 0


def test_propagate_calls_an_agent_known_by_many_names_once(client, agents):
    """Thirty names for one agent url: one /clone with the agent key, not thirty."""
    agent = _node(client, agents, "node-a")
    for n in range(30):
        assert client.post("/api/runtime/workers", json={"name": f"alias-{n}", "url": agent.url}).status_code == 201
    project = client.post("/api/runtime/projects", json={"name": "garden", "repo_url": "https://x.org/g.git"}).get_json()
    answer = client.post(f"/api/runtime/projects/{project['id']}/propagate", json={}).get_json()
    assert len(answer["results"]) == 1
    assert [path for path, _ in agent.state.operations] == ["/clone"]
