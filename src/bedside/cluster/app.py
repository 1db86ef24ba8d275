"""Build and run the cluster application: a front (ingress) and one deployment per model and graph.

`bedside cluster up` calls `start`; Ray Serve's own `serve run bedside.cluster.app:builder
repository=PATH` builds the same application from a command line or a Serve config file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import HTTPOptions, gRPCOptions

from bedside.cluster.autoscale import QueueDelayPolicy
from bedside.cluster.front import APP_NAME, FRONT, Front
from bedside.cluster.plan import Placement, plan
from bedside.cluster.replica import ModelReplica
from bedside.server.run import is_loopback
from bedside.settings import DEFAULTS, Settings

log = logging.getLogger("bedside.cluster")
FRONT_CPUS = 0.1  # the front parses no tensor: routing and queueing only
HEALTH_CHECK_S = 2.0  # a replica that dies is noticed (and replaced) within this
GRPC_SERVICE = "bedside.server.grpc.gateway:add_inference_service"  # OIP v2 at Ray Serve's gRPC proxy


def build(repository: Path, settings: Settings = DEFAULTS) -> Application:
    repository = repository.resolve()  # every node must see the repository at this path
    placements = plan(repository, settings.cluster)
    handles = {p.deployment: _replica(p, repository, settings) for p in placements}
    front = serve.deployment(
        name=FRONT,
        num_replicas=settings.cluster.front_replicas,
        ray_actor_options={"num_cpus": FRONT_CPUS},
        max_ongoing_requests=100_000,  # bounded by the gates inside it (cluster.front_queue per model)
    )(Front)
    return front.bind(placements, handles, settings)


def _replica(placement: Placement, repository: Path, settings: Settings) -> Application:
    cluster = settings.cluster
    autoscaling = {
        "min_replicas": placement.min_replicas,
        "initial_replicas": max(placement.min_replicas, 1),
        "max_replicas": placement.max_replicas,
        "target_ongoing_requests": cluster.target_ongoing,
        "metrics_interval_s": cluster.metrics_interval_s,
        "look_back_period_s": max(2 * cluster.metrics_interval_s, 1.0),
        "upscale_delay_s": cluster.upscale_delay_s,
        "downscale_delay_s": cluster.downscale_delay_s,
        "policy": {
            "policy_function": QueueDelayPolicy,
            "policy_kwargs": {"target_queue_ms": placement.target_queue_ms, "target_ongoing": cluster.target_ongoing},
        },
    }
    deployment = serve.deployment(
        name=placement.deployment,
        autoscaling_config=autoscaling,
        max_ongoing_requests=cluster.max_ongoing,
        ray_actor_options={"num_cpus": placement.cpus, "memory": placement.memory_bytes},
        health_check_period_s=HEALTH_CHECK_S,
        health_check_timeout_s=max(10.0, 5 * HEALTH_CHECK_S),
    )(ModelReplica)
    return deployment.bind(str(repository), list(placement.serves), settings)


def builder(args: dict[str, Any]) -> Application:
    """For `serve run bedside.cluster.app:builder repository=PATH` (settings from BEDSIDE_* variables)."""
    import os

    from bedside.settings import from_environment

    settings, _ = from_environment(os.environ)
    return build(Path(str(args.get("repository", "models"))), settings)


def start(repository: Path, settings: Settings = DEFAULTS) -> None:
    """Join (or start) Ray, start Serve's proxy on the cluster's ports and deploy the repository."""
    cluster = settings.cluster
    check_security(settings)
    if not ray.is_initialized():
        ray.init(address=cluster.address or None, include_dashboard=False, log_to_driver=False)
    grpc = None
    if cluster.grpc_port >= 0:
        grpc = gRPCOptions(port=cluster.grpc_port, grpc_servicer_functions=[GRPC_SERVICE])
    security = settings.security
    http = HTTPOptions(
        host=cluster.host,
        port=cluster.http_port,
        ssl_certfile=_path(security.tls_cert),
        ssl_keyfile=_path(security.tls_key),
        ssl_ca_certs=_path(security.tls_client_ca),
    )
    serve.start(http_options=http, grpc_options=grpc)
    target = serve.RunTarget(build(repository, settings), name=APP_NAME, route_prefix="/")
    serve.run_many([target], wait_for_applications_running=False)
    wait_running(cluster.deploy_timeout_s)


class DeployError(Exception):
    """The application did not come up, or may not as configured; the message says why."""


def check_security(settings: Settings) -> None:
    """The box's rule at the cluster's door: nothing beyond loopback without TLS and authentication,
    unless security.insecure says so. Ray Serve's gRPC proxy always listens on every interface
    without TLS, so it is only for a closed cluster network (security.insecure)."""
    cluster, security = settings.cluster, settings.security
    tls = bool(security.tls_cert and security.tls_key)
    if security.insecure:
        return
    if not is_loopback(cluster.host) and not (tls and security.auth):
        raise DeployError(
            f"Ray Serve's HTTP proxy would listen on {cluster.host} without TLS and authentication: give "
            "security.tls_cert, security.tls_key and security.auth, or security.insecure to accept that risk"
        )
    if cluster.grpc_port >= 0:
        raise DeployError(
            "Ray Serve's gRPC proxy listens on every interface without TLS (it offers neither a host nor TLS): "
            "set cluster.grpc_port=-1, or security.insecure=true on a closed cluster network"
        )


def _path(setting: str) -> str | None:
    return str(Path(setting).expanduser()) if setting else None


def wait_running(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        state = str(getattr(app.status, "value", app.status)) if app is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED" or time.monotonic() > deadline:
            stuck = [f"{row['deployment']} {row['status'].lower()}: {row['message'] or 'no message'}"
                     for row in describe() if row["status"] != "HEALTHY"]  # fmt: skip
            why = "failed" if state == "DEPLOY_FAILED" else f"is not running after {timeout_s:g} s"
            raise DeployError(f"the cluster application {why}; " + "; ".join(stuck))
        time.sleep(0.5)


def stop() -> None:
    serve.delete(APP_NAME)


def describe() -> list[dict[str, Any]]:
    """Each deployment: its status and replicas by state (for `bedside cluster status`)."""
    status = serve.status()
    app = status.applications.get(APP_NAME)
    if app is None:
        return []
    rows = []
    for name, deployment in sorted(app.deployments.items()):
        states = {str(getattr(k, "value", k)): int(v) for k, v in deployment.replica_states.items()}
        rows.append({"deployment": name, "status": str(getattr(deployment.status, "value", deployment.status)),
                     "replicas": states, "message": deployment.message})  # fmt: skip
    return rows


__all__ = ["DeployError", "Placement", "build", "builder", "describe", "start", "stop", "wait_running"]
