"""Container health check: exit 0 when the server's gRPC health service reports SERVING.

Docker's HEALTHCHECK (deploy/docker/*.Dockerfile) runs this inside the container, so
`docker compose ps` shows when the models are loaded and warm. Kubernetes does not need it: its
native `grpc:` probe asks the same health service (deploy/kubernetes/base/deployment.yaml).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Well below Docker's --timeout (5s), so a hung server is reported by us with a reason.
TIMEOUT_S = 2.0


def main() -> int:
    port = os.environ.get("SEQSERVE_PORT", "50051")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            print(f"unhealthy: health check failed: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
