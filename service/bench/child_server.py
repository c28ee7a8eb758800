"""The server a benchmark measures: started as a child process, so its CPU time can be read.

Serving efficiency is texts per CPU-second of the *server* process; only a server we started
ourselves has a PID whose ``/proc/PID/stat`` we can read (a remote one's CPU is unknown). The
child runs ``python -m service serve`` on a free loopback port and announces its address with
one stdout line, which is read with a deadline so a hung start cannot hang the benchmark.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, NoReturn

from pydantic import ValidationError

from service.bench.errors import BenchError
from service.server.app import READY_PREFIX
from service.server.settings import ServeSettings, refused_setting
from service.server.settings_flags import add_settings_flags, flag_name, settings_from_args

LOOPBACK = "127.0.0.1"
# Settings the benchmark decides itself: where the server listens and what it serves.
_RESERVED = ("repository", "host", "port", "metrics_host", "metrics_port")


class _RaisingParser(argparse.ArgumentParser):
    """Turns argparse's usage message into the one-line error every seqserve command gives."""

    def error(self, message: str) -> NoReturn:
        raise BenchError(f"--serve-args: {message}", "usage")


def parse_serve_args(tokens: list[str]) -> ServeSettings:
    """The settings a ``seqserve serve`` given ``tokens`` would run with (flags > env > defaults).

    Parsed with the real ``serve`` parser, so a typo fails here, before any server starts, and
    the in-process baseline is built from exactly the settings the server uses.
    """
    parser = _RaisingParser(prog="seqserve serve", add_help=False)
    add_settings_flags(parser)
    args = parser.parse_args(tokens)
    for name in _RESERVED:
        if hasattr(args, name):
            raise BenchError(f"--serve-args: {flag_name(name)} is set by seqserve bench itself",
                             "usage")
    try:
        settings, _ = settings_from_args(args)
    except ValidationError as error:
        raise BenchError(f"--serve-args: {refused_setting(error)}", "usage") from None
    return settings


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of every thread of ``pid`` so far; None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class ChildServer:
    """``seqserve serve`` in a child process on loopback, started with a deadline.

    The one launcher of a server process (the benchmark and ``seqserve demo`` use it). It waits
    for the server's ready line on stdout with ``select``, so a server that hangs while loading
    cannot hang its parent; the server's log goes to a temporary file whose last line is the
    reason given when the start fails, or to this process's stderr with ``log_to_terminal``.
    """

    def __init__(self, repository: Path, serve_args: list[str], *, log_level: str = "WARNING",
                 port: int = 0, metrics_port: int = 0, log_to_terminal: bool = False,
                 startup_timeout_s: float = 180.0, stop_timeout_s: float = 60.0) -> None:
        self.repository = repository
        self.serve_args = serve_args
        self.log_level = log_level
        self.port = port
        self.metrics_port = metrics_port
        self.log_to_terminal = log_to_terminal
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.address = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "service", "--log-level", self.log_level, "serve",
                "--repository", str(self.repository), "--host", LOOPBACK,
                "--port", str(self.port), "--metrics-host", LOOPBACK,
                "--metrics-port", str(self.metrics_port), "--poll-interval-s", "0",
                *self.serve_args]

    def start(self) -> str:
        """Start the server and return its address; raises ``BenchError`` ("startup")."""
        if not self.log_to_terminal:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self._process = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                                         stderr=self._log, stdin=subprocess.DEVNULL)
        line = self._read_ready_line(time.monotonic() + self.startup_timeout_s)
        if line is None:
            reason = self._log_tail()
            self.stop()
            raise BenchError(f"the server did not start: {reason}", "startup")
        self.address = line.removeprefix(READY_PREFIX).strip()
        return self.address

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits on its own (or a signal); its exit code.

        Raises ``subprocess.TimeoutExpired`` when ``timeout`` passes first."""
        assert self._process is not None, "not started"
        return self._process.wait(timeout)

    def _read_ready_line(self, deadline: float) -> str | None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        buffer = b""
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # the child exited
                return None
            buffer += chunk
            for line in buffer.decode("utf-8", "replace").splitlines():
                if line.startswith(READY_PREFIX):
                    return line
        return None

    def _log_tail(self) -> str:
        if self._process is not None and self._process.poll() is None:
            return f"no ready line within {self.startup_timeout_s:g}s"
        code = self._process.returncode if self._process is not None else None
        if self._log is None:
            return f"exited with code {code} (see its log above)"
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode("utf-8", "replace")
                 .splitlines() if line.strip()]
        return lines[-1] if lines else f"exited with code {code}"

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.pid) if self._process is not None else None

    def stop(self) -> int | None:
        """SIGTERM (a clean drain), then SIGKILL if the drain overruns."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def __enter__(self) -> ChildServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
