"""``seqserve replicas``: scale-out checked for real on this machine.

Starts N `seqserve serve` replicas (default 3) on loopback, serving a temporary copy of the
newest version of one model, and drives them through one gRPC channel that balances with
gRPC's own round_robin policy and retries UNAVAILABLE (the service config a client in
Kubernetes would use over a headless Service). Under steady load it then:

  1. measures throughput against 1 replica and against all of them;
  2. publishes a new model version: every replica must pick it up, with 0 failed calls;
  3. drains one replica (SIGTERM) and kills another (SIGKILL): at least 99.9% of calls must
     succeed, and only calls in flight at the kill may fail.

The repository given is never modified. Throughput scales only with free cores: on a machine
with fewer cores than replicas + 1 (the load generator), 3 replicas cannot beat 1 by much.

Exit codes: 0 every check held, 4 a check failed or a replica failed (figures still printed),
1 a replica did not start, 2 bad flags, 3 no such model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode

# How each kind of failure ends the command (as for `seqserve bench`).
_EXIT_CODES = {"usage": ExitCode.USAGE, "data": ExitCode.DATA_ERROR,
               "server": ExitCode.SERVER_ERROR, "startup": ExitCode.FAILURE}


def add_replicas_command(commands: argparse._SubParsersAction) -> None:
    replicas = commands.add_parser(
        "replicas", help="run N replicas on loopback: round_robin, hot reload, drain and kill",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    replicas.add_argument("--repository", type=Path, default=defaults.REPOSITORY,
                          metavar="DIR", help="default: ./%(default)s (read only)")
    replicas.add_argument("--model", metavar="NAME",
                          help="the model to serve (default: the repository's first)")
    replicas.add_argument("--replicas", type=int, default=3, metavar="N",
                          help="server processes, at least 3 (default: %(default)s)")
    replicas.add_argument("--callers", type=int, default=16, metavar="N",
                          help="concurrent closed-loop callers (default: %(default)s)")
    replicas.add_argument("--requests", type=int, default=2000, metavar="N",
                          help="calls per throughput measurement (default: %(default)s)")
    replicas.add_argument("--poll-interval-s", type=float, default=0.2, metavar="S",
                          help="the replicas' repository poll (default: %(default)s)")
    replicas.add_argument("--drain-grace-s", type=float, default=5.0, metavar="S",
                          help="the replicas' drain grace (default: %(default)s)")
    replicas.add_argument("--max-attempts", type=int, default=5, choices=range(1, 6),
                          metavar="N", help="attempts per call, 1-5; 1 turns retries off, to "
                          "see what they save (default: %(default)s)")
    replicas.add_argument("--serve-args", default="--intra-op-threads 1", metavar="'FLAGS'",
                          help="more `seqserve serve` flags for every replica, quoted "
                          "(default: '%(default)s')")
    replicas.add_argument("--server-log-level", default="WARNING",
                          choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                          help="the replicas' log level (default: %(default)s)")
    replicas.add_argument("--json", action="store_true", help="print one JSON object")
    replicas.set_defaults(handler=handle_replicas)


def summary(report: dict[str, Any]) -> str:
    one, every = report["throughput"]["one"], report["throughput"]["all"]
    reload, failover = report["reload"], report["failover"]
    lines = [
        f"{report['replicas']} replicas of {report['model']}, {report['callers']} callers, "
        f"{report['max_attempts']} attempt(s) per call, {report['cpu_count']} CPU cores",
        f"throughput: 1 replica {one['texts_per_s']:.0f} texts/s, {every['replicas']} replicas "
        f"{every['texts_per_s']:.0f} texts/s: x{report['throughput']['ratio']:.2f}",
        *(f"  {row['replicas']} replica(s): {row['servers_cores_busy']} cores busy serving, "
          f"{row['client_cores_busy']} in the load generator" for row in (one, every)),
        f"reload: v{reload['from_version']} -> v{reload['to_version']} on "
        f"{reload['replicas_serving_new']}/{report['replicas']} replicas in "
        f"{reload['seconds_until_all_switched']:.2f}s; {reload['failed']} of {reload['calls']} "
        "calls failed",
        f"failover: {failover['failed']} of {failover['calls']} calls failed "
        f"(success {failover['success_rate']:.4%}; {failover['in_flight_at_kill']} in flight "
        f"at the kill); drained replica exit {failover['drained_exit_code']}, killed "
        f"{failover['killed_exit_code']}",
    ]
    if (report["cpu_count"] or 1) < report["replicas"] + 1:
        lines.append("note: fewer cores than replicas + load generator: throughput cannot "
                     "scale here; the figure shows the machine's limit, not seqserve's")
    lines += [f"{'ok  ' if held else 'FAIL'} {claim}" for claim, held in report["checks"].items()]
    return "\n".join(lines)


def handle_replicas(args: argparse.Namespace) -> int:
    from service.bench.child_server import parse_serve_args
    from service.bench.errors import BenchError
    from service.bench.replicas import ReplicaConfig, run_replicas

    if args.callers < 1 or args.requests < 1 or args.poll_interval_s <= 0:
        raise CommandError("--callers, --requests and --poll-interval-s must be positive",
                           ExitCode.USAGE)
    serve_args = shlex.split(args.serve_args)
    config = ReplicaConfig(
        repository=args.repository, model=args.model, replicas=args.replicas,
        callers=args.callers, throughput_requests=args.requests,
        poll_interval_s=args.poll_interval_s, drain_grace_s=args.drain_grace_s,
        serve_args=tuple(serve_args), log_level=args.server_log_level,
        max_attempts=args.max_attempts)

    def progress(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    try:
        parse_serve_args(serve_args)  # a typo fails here, before any replica starts
        report = run_replicas(config, progress)
    except BenchError as error:
        raise CommandError(str(error), _EXIT_CODES[error.kind]) from None
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return ExitCode.OK if report["ok"] else ExitCode.SERVER_ERROR
