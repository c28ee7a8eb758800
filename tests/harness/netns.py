"""Replicas on a real network: one Linux network namespace per replica, each joined to the host
by its own veth pair, so a test can do to one replica what a cluster does to a node.

Replica ``i`` lives in namespace ``seqserve-net-i``; the host end of its pair is ``sqsnet{i}h``
(``10.213.{i+1}.1/30``) and the namespace end ``sqsnet{i}n`` (``10.213.{i+1}.2/30``). The
namespaces get no default route and the host forwards nothing to them, so no packet leaves the
machine; 10.213.0.0/16 is the suite's own range (the set-up fails if the host already uses it).

Faults, as a cluster has them:

- ``cut``: the namespace end set down *inside* the namespace. The host end loses its carrier
  and packets to the replica vanish: no RST, no ICMP, so a client only learns of it from a
  deadline, a keepalive ping or TCP's own retransmission timeout.
- the process stopped (SIGSTOP): its kernel still ACKs, nothing answers.
- the process killed (SIGKILL), and a fresh one started on the same address.

Root is needed (``ip netns``, ``ip link``). A lock file serialises runs on one machine (two
sessions of the suite would otherwise tear down each other's namespaces); holding it, whatever
carries the suite's names is a crashed run's leftover, removed before the set-up.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from harness.processes import serve_process
from harness.system_tools import INSTALL, which

NAMESPACE_PREFIX = "seqserve-net-"
LINK_PREFIX = "sqsnet"  # + index + "h" (host end) or "n" (namespace end); 15 characters at most
SUITE_RANGE = "10.213."
PORT = 50051  # every namespace has its own ports: the same one in each, as pods have
LOCK_FILE = Path("/run/seqserve-netns.lock")
LOCK_TIMEOUT_S = 300.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Namespace:
    index: int

    @property
    def name(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.index}"

    @property
    def host_link(self) -> str:
        return f"{LINK_PREFIX}{self.index}h"

    @property
    def inner_link(self) -> str:
        return f"{LINK_PREFIX}{self.index}n"

    @property
    def host_ip(self) -> str:
        return f"{SUITE_RANGE}{self.index + 1}.1"

    @property
    def ip(self) -> str:
        return f"{SUITE_RANGE}{self.index + 1}.2"

    @property
    def address(self) -> str:
        return f"{self.ip}:{PORT}"

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace (``ip netns exec``
        execs it, so the child's pid is the program's own)."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inner_link,
            "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        inside = ["-n", self.name]
        _ip(*inside, "addr", "add", f"{self.ip}/30", "dev", self.inner_link)
        _ip(*inside, "link", "set", self.inner_link, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def cut(self) -> None:
        """Packets to and from the replica vanish (the namespace end down, from inside)."""
        _ip("-n", self.name, "link", "set", self.inner_link, "down")

    def reconnect(self) -> None:
        _ip("-n", self.name, "link", "set", self.inner_link, "up")

    def remove(self) -> None:
        remove_namespace(self.name)


def remove_namespace(name: str) -> None:
    """Kill what still runs in it, then delete it (which deletes its veth pair too)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "delete", name, check=False)


def remove_leftovers() -> None:
    """What a crashed earlier run left: its namespaces and any host end of a veth pair."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NAMESPACE_PREFIX):
            remove_namespace(name)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(LINK_PREFIX):
            _ip("link", "delete", link, check=False)


def _check_range_is_free() -> None:
    taken = [line for line in _ip("-o", "-4", "addr", "show").stdout.splitlines()
             if f" {SUITE_RANGE}" in line]
    if taken:
        raise RuntimeError(f"the host already uses {SUITE_RANGE}0.0/16, the suite's range: "
                           f"{taken[0].split()[1]}")


@contextmanager
def _machine_lock() -> Iterator[None]:
    with open(LOCK_FILE, "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{LOCK_FILE}: another run holds the network "
                                       f"namespaces for over {LOCK_TIMEOUT_S:g}s") from None
                time.sleep(0.5)  # polling a lock another process holds: nothing to wait on
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def require_root_and_ip() -> None:
    if os.geteuid() != 0:
        pytest.fail("the replica network tests create network namespaces: run them as root",
                    pytrace=False)
    if which("ip") is None:
        pytest.fail(f"ip (iproute2) is not installed: {INSTALL}", pytrace=False)


@contextmanager
def namespaces(count: int) -> Iterator[list[Namespace]]:
    """``count`` fresh namespaces, removed on exit whatever happened inside."""
    require_root_and_ip()
    with _machine_lock():
        remove_leftovers()
        _check_range_is_free()
        created: list[Namespace] = []
        try:
            for index in range(count):
                namespace = Namespace(index)
                created.append(namespace)
                namespace.create()
            yield created
        finally:
            for namespace in created:
                namespace.remove()
            remove_leftovers()


class Replica:
    """One ``seqserve serve`` process in a namespace, on ``namespace.address``.

    ``slow_file``: while it exists, every batch of the replica's model thread first sleeps the
    seconds it holds (``slow``/``fast`` switch it at run time; ``serve_process``)."""

    def __init__(self, namespace: Namespace, repository: Path, log_dir: Path,
                 flags: Sequence[str] = ()) -> None:
        self.namespace, self.repository, self.flags = namespace, repository, tuple(flags)
        self.slow_file = log_dir / f"slow-{namespace.index}"
        self.log_path = log_dir / f"replica-{namespace.index}.log"
        self.process: subprocess.Popen[str] | None = None
        self.starts = 0
        self._log: IO[str] | None = None

    @property
    def address(self) -> str:
        return self.namespace.address

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> Replica:
        """Start a fresh process on the same address (after a kill: the replica added back)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "a")  # noqa: SIM115 - lives as long as it runs
        self.process, address = serve_process(
            self.repository, "--metrics-port", "0", *self.flags, host=self.namespace.ip,
            port=PORT, prefix=self.namespace.prefix(), slow_file=self.slow_file,
            log_level="WARNING", stderr=self._log)
        assert address == self.address, (address, self.address)
        self.starts += 1
        return self

    def slow(self, delay_s: float) -> None:
        staging = self.slow_file.with_suffix(".tmp")
        staging.write_text(f"{delay_s}")
        staging.rename(self.slow_file)  # atomic: a batch reads the old state or the new one

    def fast(self) -> None:
        self.slow_file.unlink(missing_ok=True)

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        return self.process.wait(30)

    def stop(self) -> None:
        """Whatever state it is in (stopped included), the process is gone afterwards."""
        self.fast()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def replica_cluster(repository: Path, log_dir: Path, count: int = 3,
                    flags: Sequence[str] = ()) -> Iterator[list[Replica]]:
    """``count`` namespaces with one started replica each (their start-ups overlap); every
    process and namespace gone on exit, whatever happened inside."""
    with namespaces(count) as created:
        replicas = [Replica(namespace, repository, log_dir, flags) for namespace in created]
        try:
            with ThreadPoolExecutor(max_workers=count) as pool:
                for started in [pool.submit(replica.start) for replica in replicas]:
                    started.result()
            yield replicas
        finally:
            for replica in replicas:
                replica.stop()
