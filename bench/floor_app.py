"""The floor under BLOOM Runtime's per-request cost: a bare Flask app that answers a JSON
POST with a small JSON object, run by bench/run.py under the same gunicorn settings
(gthread, the same workers, threads and keep-alive) and the same clients as the service.
Whatever a lifecycle request costs above this app's CPU per request is ours.

    gunicorn --worker-class gthread --workers 4 --threads 8 --chdir bench floor_app:app
"""
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/api/runtime/health")
def health():
    return jsonify(status="ok")


@app.post("/floor/<item_id>")
def echo(item_id: str):
    body = request.get_json()
    return jsonify(id=item_id, lease_id=body.get("lease_id"), worker_id=body.get("worker_id"), status="running")
