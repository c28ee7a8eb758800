"""Scale-out for real: three ``seqserve serve`` processes on one repository, one gRPC channel
balancing over them with ``round_robin`` and retrying UNAVAILABLE, through ``seqserve
replicas`` exactly as a user runs it. The figures asserted are counts and rates, not timings.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from harness.cli import run_cli
from harness.tiny_models import LSTM_NAME

from service.bench.replicas import MIN_SUCCESS_RATE, checks, publish_copy, stage_repository
from service.replica_client import (
    CLASSIFIER,
    RETRYABLE_CODES,
    round_robin_target,
    service_config,
)
from service.repo.layout import latest_version, versions


@pytest.fixture(scope="module")
def report(tiny_repository: Path) -> dict[str, Any]:
    """One real run for the whole module (about 15 s on 2 cores)."""
    before = sorted(p.relative_to(tiny_repository) for p in tiny_repository.rglob("*"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli(["replicas", "--repository", str(tiny_repository), "--model", LSTM_NAME,
                        "--requests", "1500", "--json"])
    after = sorted(p.relative_to(tiny_repository) for p in tiny_repository.rglob("*"))
    assert before == after, "seqserve replicas changed the repository it was given"
    document = json.loads(out.getvalue())
    document["exit_code"] = code
    # Shown with -s, and in the output of a failing test.
    print("replica figures:", json.dumps(
        {key: document[key] for key in ("throughput", "reload", "failover")}))
    return document


@pytest.mark.timeout(120)
def test_every_check_holds_and_the_command_says_so(report: dict[str, Any]) -> None:
    assert report["checks"], "no checks"
    failed = [claim for claim, held in report["checks"].items() if not held]
    assert not failed, f"failed: {failed}\n{json.dumps(report, indent=2)}"
    assert report["ok"] and report["exit_code"] == 0


@pytest.mark.timeout(120)
def test_a_new_version_reaches_every_replica_without_a_failed_call(
        report: dict[str, Any]) -> None:
    reload = report["reload"]
    assert reload["failed"] == 0
    assert reload["replicas_serving_new"] == report["replicas"] == 3
    assert reload["to_version"] == reload["from_version"] + 1
    # The load ran across the switch: both versions answered calls through the balancer.
    answered = reload["calls_by_version"]
    assert answered.get(str(reload["from_version"]), 0) > 0
    assert answered.get(str(reload["to_version"]), 0) > 0


@pytest.mark.timeout(120)
def test_drain_and_kill_cost_at_most_the_killed_replicas_calls(report: dict[str, Any]) -> None:
    failover = report["failover"]
    assert failover["calls"] >= 2000
    assert failover["success_rate"] >= MIN_SUCCESS_RATE
    assert failover["failed"] <= failover["in_flight_at_kill"] <= report["callers"]
    assert failover["failed_not_in_flight_at_kill"] == 0
    assert set(failover["failed_codes"]) <= set(RETRYABLE_CODES)
    assert failover["drained_exit_code"] == 0, "the drained replica did not exit cleanly"
    assert failover["killed_exit_code"] == -9


@pytest.mark.timeout(120)
def test_throughput_of_one_and_of_three_replicas_is_reported(report: dict[str, Any]) -> None:
    one, three = report["throughput"]["one"], report["throughput"]["all"]
    assert (one["replicas"], three["replicas"]) == (1, 3)
    for row in (one, three):
        assert row["failed"] == 0 and row["calls"] >= 1500
        assert row["texts_per_s"] > 0 and row["servers_cores_busy"] > 0
    # No speed-up is asserted: on a machine with fewer cores than replicas it cannot appear.
    assert report["throughput"]["ratio"] == pytest.approx(
        three["texts_per_s"] / one["texts_per_s"], rel=1e-2)


# --- the parts, without servers ---------------------------------------------------------------


def test_the_service_config_balances_and_retries_only_idempotent_inference() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": CLASSIFIER}
    (method,) = config["methodConfig"]
    assert {(n["service"], n["method"]) for n in method["name"]} == {
        (CLASSIFIER, "Classify"), ("inference.GRPCInferenceService", "ModelInfer")}
    retry = method["retryPolicy"]
    assert "UNAVAILABLE" in retry["retryableStatusCodes"]
    assert 2 <= retry["maxAttempts"] <= 5  # gRPC caps attempts at 5
    assert round_robin_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    (without,) = service_config(max_attempts=1)["methodConfig"]
    assert "retryPolicy" not in without  # gRPC refuses maxAttempts 1


def test_publishing_a_copy_is_a_new_complete_version(tiny_repository: Path,
                                                     tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    version = stage_repository(tiny_repository, LSTM_NAME, repository)
    assert [v.version for v in versions(repository, LSTM_NAME)] == [version]
    new = publish_copy(repository, LSTM_NAME, version)
    newest = latest_version(repository, LSTM_NAME)
    assert newest is not None and newest.version == new == version + 1
    manifest = newest.load_manifest()  # name and version agree with the directory
    assert manifest.version == new
    assert not [p for p in (repository / LSTM_NAME).iterdir() if p.name.startswith(".")]
    shutil.rmtree(repository)


def test_checks_fail_on_figures_that_break_a_claim(report: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(report))
    broken["reload"]["failed"] = 1
    broken["failover"]["success_rate"] = 0.99
    broken["failover"]["failed_not_in_flight_at_kill"] = 2
    held = checks(broken)
    assert not held["reload: 0 failed calls"]
    assert not held[f"failover: success rate >= {MIN_SUCCESS_RATE:.1%}"]
    assert not held["failover: failures only among calls in flight at the kill"]
