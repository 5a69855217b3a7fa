"""The agent install script: `curl -sSL "<server>/api/runtime/agent-install-script?node_id=<id>" | bash`.

A bash script that installs the Membridge agent on a Linux node: clone its repository,
a virtualenv with its requirements, an env file, a systemd unit or OpenRC service
(whichever the node has), started. It holds no secret: the agent key and the runtime key
come from the environment of the shell that runs it, and it stops with a clear message
without them.

No value becomes shell code, on any path: the query's values are checked by their
alphabet (bloom/schemas.py: a node id is a hostname, a URL holds only URL characters
and none of ` $ ' " \), quoted (shlex.quote) into the script, and quoted again for every
file a shell or systemd reads on the node: agent.env (sourced by the OpenRC service,
read by systemd) and the OpenRC service's start script. The node id defaults to the
node's hostname, evaluated and checked on the node.
"""
from __future__ import annotations

import re
import shlex

DEFAULT_REPO_URL = "https://github.com/maxfraieho/membridge.git"
_PLACEHOLDER = re.compile(r"__(?:RUNTIME_URL|CONTROL_PLANE_URL|REPO_URL|AGENT_PORT|NODE_ID)__")

_SCRIPT = r"""#!/usr/bin/env bash
# The values from the query are in single quotes on purpose: whatever they hold, never expanded.
# shellcheck disable=SC2016
# Installs the Membridge agent on this node and starts it as a service.
# Written by BLOOM Runtime for this deployment. It holds no secret: set the agent key and
# the runtime key in the environment of the shell that runs it, e.g.
#   curl -sSL "<server>/api/runtime/agent-install-script" | MEMBRIDGE_AGENT_KEY=... RUNTIME_API_KEY=... bash
set -euo pipefail

RUNTIME_URL=__RUNTIME_URL__
CONTROL_PLANE_URL=__CONTROL_PLANE_URL__
REPO_URL=__REPO_URL__
AGENT_PORT=__AGENT_PORT__
NODE_ID=__NODE_ID__
if [ -z "$NODE_ID" ]; then
  NODE_ID="$(hostname)"
fi
case "$NODE_ID" in
  '' | *[!A-Za-z0-9._-]*)
    echo "The node id may hold only letters, digits, '.', '_' and '-' (give node_id= in the script's URL)." >&2
    exit 1 ;;
esac
MEMBRIDGE_DIR="${MEMBRIDGE_DIR:-$HOME/membridge}"

if [ -z "${MEMBRIDGE_AGENT_KEY:-}" ] || [ -z "${RUNTIME_API_KEY:-}" ]; then
  echo "Set MEMBRIDGE_AGENT_KEY and RUNTIME_API_KEY (ask the operator of $RUNTIME_URL) in this shell's environment, then run this script again." >&2
  exit 1
fi
# Values go into files that sh sources or systemd reads, in single quotes (both take
# 'text' as it is): one holding a quote, a backslash or a line break is refused here.
for name in CONTROL_PLANE_URL RUNTIME_URL NODE_ID AGENT_PORT MEMBRIDGE_DIR MEMBRIDGE_AGENT_KEY RUNTIME_API_KEY; do
  case "${!name}" in
    *"'"* | *\\* | *$'\n'* | *$'\r'*)
      echo "$name may not hold a quote, a backslash or a line break." >&2
      exit 1 ;;
  esac
done
quoted() { printf "'%s'" "$1"; }
for tool in git python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$tool is needed to install the agent." >&2
    exit 1
  fi
done

if [ -d "$MEMBRIDGE_DIR/.git" ]; then
  git -C "$MEMBRIDGE_DIR" pull --ff-only
else
  git clone "$REPO_URL" "$MEMBRIDGE_DIR"
fi
python3 -m venv "$MEMBRIDGE_DIR/.venv"
requirements="$MEMBRIDGE_DIR/requirements.txt"
if [ -f "$MEMBRIDGE_DIR/agent/requirements.txt" ]; then
  requirements="$MEMBRIDGE_DIR/agent/requirements.txt"
fi
"$MEMBRIDGE_DIR/.venv/bin/pip" install --quiet -r "$requirements"

env_file="$MEMBRIDGE_DIR/agent.env"
env_lines="$(
  printf 'MEMBRIDGE_SERVER_URL=%s\n' "$(quoted "$CONTROL_PLANE_URL")"
  printf 'BLOOM_RUNTIME_URL=%s\n' "$(quoted "$RUNTIME_URL")"
  printf 'MEMBRIDGE_NODE_ID=%s\n' "$(quoted "$NODE_ID")"
  printf 'MEMBRIDGE_AGENT_PORT=%s\n' "$(quoted "$AGENT_PORT")"
  printf 'MEMBRIDGE_AGENT_KEY=%s\n' "$(quoted "$MEMBRIDGE_AGENT_KEY")"
  printf 'RUNTIME_API_KEY=%s\n' "$(quoted "$RUNTIME_API_KEY")"
  # The agent refuses update, restart and uninstall from its control plane without it.
  printf 'MEMBRIDGE_ALLOW_PROCESS_CONTROL=1\n'
)"
(
  umask 077
  printf '%s\n' "$env_lines" > "$env_file"
)
start="$MEMBRIDGE_DIR/.venv/bin/python -m uvicorn agent.main:app --host 0.0.0.0 --port $AGENT_PORT"

if command -v systemctl >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    unit_dir="${SYSTEMD_UNIT_DIR:-/etc/systemd/system}"
    manage=(systemctl)
    wanted_by=multi-user.target
  else
    unit_dir="${SYSTEMD_UNIT_DIR:-$HOME/.config/systemd/user}"
    manage=(systemctl --user)
    wanted_by=default.target
  fi
  mkdir -p "$unit_dir"
  cat > "$unit_dir/membridge-agent.service" <<UNIT
[Unit]
Description=Membridge agent (BLOOM Runtime node $NODE_ID)
After=network-online.target

[Service]
EnvironmentFile=$env_file
WorkingDirectory=$MEMBRIDGE_DIR
ExecStart=$start
Restart=always
RestartSec=5

[Install]
WantedBy=$wanted_by
UNIT
  "${manage[@]}" daemon-reload
  "${manage[@]}" enable --now membridge-agent.service
  echo "Membridge agent installed as node $NODE_ID: ${manage[*]} status membridge-agent"
elif command -v rc-service >/dev/null 2>&1; then
  init_dir="${OPENRC_DIR:-/etc/init.d}"
  # openrc-run sources the service file, and the start script sources agent.env: every
  # value in them is quoted.
  start_script="$MEMBRIDGE_DIR/start-agent.sh"
  start_lines="$(
    printf '#!/bin/sh\nset -a\n. %s\nset +a\n' "$(quoted "$env_file")"
    printf 'exec %s -m uvicorn agent.main:app --host 0.0.0.0 --port %s\n' \
      "$(quoted "$MEMBRIDGE_DIR/.venv/bin/python")" "$(quoted "$AGENT_PORT")"
  )"
  service_lines="$(
    printf '#!/sbin/openrc-run\n'
    printf 'description=%s\n' "$(quoted "Membridge agent (BLOOM Runtime node $NODE_ID)")"
    printf 'command=%s\n' "$(quoted "$start_script")"
    printf 'command_background=true\n'
    printf 'directory=%s\n' "$(quoted "$MEMBRIDGE_DIR")"
    printf 'pidfile=/run/membridge-agent.pid\n'
  )"
  printf '%s\n' "$start_lines" > "$start_script"
  chmod 755 "$start_script"
  printf '%s\n' "$service_lines" > "$init_dir/membridge-agent"
  chmod 755 "$init_dir/membridge-agent"
  rc-update add membridge-agent default
  rc-service membridge-agent start
  echo "Membridge agent installed as node $NODE_ID: rc-service membridge-agent status"
else
  echo "Neither systemd nor OpenRC found: start the agent yourself with" >&2
  echo "  set -a; . $env_file; set +a; $start" >&2
  exit 1
fi
"""


def install_script(*, runtime_url: str, control_plane_url: str, node_id: str | None, port: int,
                   repo_url: str) -> str:
    """The script, every value quoted for the shell."""
    values = {
        "__RUNTIME_URL__": runtime_url,
        "__CONTROL_PLANE_URL__": control_plane_url,
        "__REPO_URL__": repo_url,
        "__AGENT_PORT__": str(port),
        "__NODE_ID__": node_id or "",
    }
    # One pass over the template: a value that looks like a placeholder stays a value.
    return _PLACEHOLDER.sub(lambda match: shlex.quote(values[match.group(0)]), _SCRIPT)
