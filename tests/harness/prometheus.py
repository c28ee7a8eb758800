"""A real Prometheus for tests, and what tests need to check PromQL against the server.

``run_prometheus`` starts the ``prometheus`` binary (Debian's package, which
``scripts/install-test-deps`` installs) on a free loopback port with its own config and
storage in a temporary directory, scraping one target as job ``seqserve`` and evaluating the
repository's rules; it always stops the process. The handle queries the HTTP API with urllib,
so no client library is needed.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness import REPO_ROOT as ROOT
from harness.system_tools import require

DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RECORDING_RULES = PROMETHEUS_DIR / "rules" / "recording.yml"
ALERTING_RULES = PROMETHEUS_DIR / "rules" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "seqserve.json"

# What Grafana would put in place of its macros, at the dashboard's usual time range.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Every template variable is a multi-select whose "All" is this regex (always used with =~).
TEMPLATE_ALL = ".*"

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


def free_port() -> int:
    """A loopback port free right now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrometheusHandle:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluates ``expr`` now; the ``result`` list of /api/v1/query.

        A scalar or string result comes back as one item without labels.
        """
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("vector", "matrix"):
            return list(data["result"])
        return [{"metric": {}, "value": data["result"]}]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
        interval: float = 0.5,
    ) -> list[dict[str, Any]]:
        """Queries ``expr`` until ``predicate(result)`` holds; returns that result.

        Raises TimeoutError with the last result when it does not hold within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expr!r}: condition not met in {timeout}s; last: {result}")
            self._check_running()
            time.sleep(interval)

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, with its ``health`` and ``lastError`` (/api/v1/rules)."""
        data = self._get("/api/v1/rules", {})
        return [rule for group in data["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with ``health`` and ``lastError`` (/api/v1/targets)."""
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def dashboard_expressions(self, dashboard: Path = DASHBOARD) -> list[str]:
        return dashboard_expressions(dashboard)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            # The API explains a bad query in a JSON body with a 4xx status.
            try:
                body = json.load(error)
            except ValueError:
                raise PrometheusError(f"{path} {params}: HTTP {error.code}") from error
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]


def write_config(
    path: Path,
    scrape_target: str,
    *,
    scrape_interval: str,
    rule_files: Sequence[Path],
) -> None:
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            # Prometheus refuses a timeout longer than the interval (default 10s).
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [
            {"job_name": "seqserve", "static_configs": [{"targets": [scrape_target]}]}
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def run_prometheus(
    scrape_target: str,
    tmp_dir: Path,
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (RECORDING_RULES, ALERTING_RULES),
    port: int | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[PrometheusHandle]:
    """Runs Prometheus scraping ``scrape_target`` (``host:port``) as job ``seqserve``.

    Listens on 127.0.0.1 only, at ``port`` or a free port; config, data and log live in
    ``tmp_dir``. Yields once /-/ready answers; the process is stopped however the block ends.
    """
    binary = require("prometheus")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config = tmp_dir / "prometheus.yml"
    write_config(config, scrape_target, scrape_interval=scrape_interval, rule_files=rule_files)
    listen_port = port if port is not None else free_port()
    log_path = tmp_dir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{listen_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    handle = PrometheusHandle(f"http://127.0.0.1:{listen_port}", process, log_path)
    try:
        _wait_ready(handle, startup_timeout)
        yield handle
    finally:
        _stop(process)


def _wait_ready(handle: PrometheusHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        handle._check_running()
        try:
            with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=1.0) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while the TSDB opens
        if time.monotonic() >= deadline:
            raise PrometheusError(f"prometheus not ready after {timeout}s:\n{handle.log_tail()}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the deploy files -------------------------------------------------------------------------


def dashboard_panels(dashboard: Path = DASHBOARD) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included (collapsed rows hold their panels)."""
    panels: list[dict[str, Any]] = []
    for panel in json.loads(dashboard.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def template_variables(dashboard: Path = DASHBOARD) -> list[str]:
    return [v["name"] for v in json.loads(dashboard.read_text())["templating"]["list"]]


def substitute(expr: str, variables: Sequence[str]) -> str:
    """Grafana's macros and the template variables replaced, as Grafana would at "All"."""
    for macro, value in GRAFANA_MACROS.items():
        expr = re.sub(re.escape(macro) + r"\b", value, expr)
    for name in variables:
        # $name, ${name}, ${name:format} and the old [[name]]
        pattern = rf"\$\{{{name}(?::[^}}]*)?\}}|\${name}\b|\[\[{name}\]\]"
        expr = re.sub(pattern, TEMPLATE_ALL, expr)
    return expr


def dashboard_expressions(dashboard: Path = DASHBOARD) -> list[str]:
    """Every panel query of the dashboard as plain PromQL, each once, in panel order."""
    variables = template_variables(dashboard)
    expressions: list[str] = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if expr:
                plain = substitute(expr, variables)
                if plain not in expressions:
                    expressions.append(plain)
    return expressions


def recording_rule_names(path: Path = RECORDING_RULES) -> list[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule["record"] for group in groups for rule in group["rules"] if "record" in rule]


def exported_metric_names() -> set[str]:
    """Sample names the server exposes, from the metric families of ``service/server/metrics.py``.

    A counter ``x`` is scraped as ``x_total``, a histogram as ``x_bucket``, ``x_count`` and
    ``x_sum``; the ``_created`` samples are left out on purpose (nothing should use them).
    """
    from service.server.metrics import ServingMetrics

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
    }
    names: set[str] = set()
    for family in ServingMetrics().registry.collect():
        if family.type not in suffixes:
            raise ValueError(f"{family.name}: metric type {family.type} not handled here")
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


# Metrics Prometheus itself makes for every target.
SCRAPE_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_RANGE = re.compile(r"\[[^\]]*\]")
_PROMQL_MATCHERS = re.compile(r"\{[^{}]*\}")
_PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_PROMQL_DURATION = re.compile(r"\b\d+(?:ms|s|m|h|d|w|y)\b")
_PROMQL_NUMBER = re.compile(r"\b\d+(?:\.\d*)?(?:[eE][+-]?\d+)?\b|\.\d+")
_PROMQL_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (enough for this repository's expressions).

    Strings, label matchers, ranges, grouping clauses and numbers are removed first; a name
    followed by ``(`` is a function or an aggregation, not a metric.
    """
    text = _PROMQL_STRING.sub(" ", expr)
    text = _PROMQL_RANGE.sub(" ", text)
    text = _PROMQL_MATCHERS.sub(" ", text)
    text = _PROMQL_GROUPING.sub(" ", text)
    text = _PROMQL_DURATION.sub(" ", text)
    text = _PROMQL_NUMBER.sub(" ", text)
    names = set()
    for match in _PROMQL_NAME.finditer(text):
        name = match.group()
        if name.lower() in _PROMQL_KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names
