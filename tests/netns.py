"""Hosts with a network of their own, for fault tests: Linux network namespaces joined by a
switch (a bridge in a namespace of its own), each with one address, and nftables rules to
cut a host off from another (this kernel has no netem). Needs root, `ip` and `nft`; every
address lives inside the namespaces, none on the machine's own interfaces.

Processes run in a host with `host.command(argv)` (`ip netns exec`). Code of this process
reaches a host's network through `host.call(fn)`: fn runs on a thread that has joined the
namespace, so the sockets it opens, and the threads it starts (a server's accept loop, a
stand-in agent's handlers and callbacks), are in that host's network.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (Debian: iproute2, nftables)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


class Host:
    def __init__(self, network: Network, name: str, address: str) -> None:
        self.network, self.name, self.address = network, name, address
        self.namespace = f"bloom-{name}-{network.tag}"
        self._cut_table = "bloomcut"

    def command(self, argv: list[str]) -> list[str]:
        """argv, run inside this host's network."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def call(self, fn: Callable[[], T]) -> T:
        """fn() on a thread inside this host's network; its result, or its exception."""
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                _join_namespace(self.namespace)
                outcome["value"] = fn()
            except BaseException as error:  # handed to the caller
                outcome["error"] = error

        thread = threading.Thread(target=inside, name=f"in-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def listening_socket(self, port: int = 0) -> socket.socket:
        """A TCP socket listening on this host's address (it stays in this network
        whichever thread accepts on it)."""
        return self.call(lambda: socket.create_server((self.address, port), backlog=128))

    def cut_from(self, *others: Host) -> None:
        """Drop every packet between this host and the others, both ways, silently (no
        reset, no ICMP): a partition. Sessions stay open on both sides."""
        rules = "\n".join(
            f"add rule inet {self._cut_table} {chain} ip {direction} {other.address} drop"
            for other in others for chain, direction in (("input", "saddr"), ("output", "daddr"))
        )
        script = (f"add table inet {self._cut_table}\n"
                  f"add chain inet {self._cut_table} input {{ type filter hook input priority 0; }}\n"
                  f"add chain inet {self._cut_table} output {{ type filter hook output priority 0; }}\n"
                  f"{rules}\n")
        subprocess.run(self.command(["nft", "-f", "-"]), input=script, check=True, capture_output=True, text=True)

    def heal(self) -> None:
        """Undo every cut_from of this host."""
        subprocess.run(self.command(["nft", "delete", "table", "inet", self._cut_table]), capture_output=True)


class Network:
    """A switch and the hosts plugged into it, on SUBNET.0/24; `close()` removes it all."""

    def __init__(self) -> None:
        problem = unavailable()
        if problem:
            raise RuntimeError(f"network namespaces: {problem}")
        self.tag = uuid.uuid4().hex[:6]
        self.hosts: list[Host] = []
        self._switch = f"bloom-sw-{self.tag}"
        _run("ip", "netns", "add", self._switch)
        _run("ip", "-n", self._switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self._switch, "link", "set", "br0", "up")

    def add_host(self, name: str) -> Host:
        host = Host(self, name, f"{SUBNET}.{len(self.hosts) + 2}")
        index = len(self.hosts)
        self.hosts.append(host)
        _run("ip", "netns", "add", host.namespace)
        # A veth pair, made here and moved at once: its names are unique to this network.
        inner, outer = f"bi{index}{self.tag}", f"bo{index}{self.tag}"
        _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        _run("ip", "link", "set", inner, "netns", host.namespace)
        _run("ip", "link", "set", outer, "netns", self._switch)
        _run("ip", "-n", self._switch, "link", "set", outer, "master", "br0", "up")
        _run("ip", "-n", host.namespace, "link", "set", inner, "name", "eth0")
        _run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        for namespace in [host.namespace for host in self.hosts] + [self._switch]:
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("ip", "netns", "delete", namespace)


def _join_namespace(namespace: str) -> None:
    """Move the calling thread (only it, and the threads it starts) into `namespace`."""
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {namespace}: {os.strerror(error)}")
    finally:
        os.close(fd)
