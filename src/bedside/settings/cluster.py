"""The `cluster` section: bedside on a Ray Serve cluster (`bedside cluster`), past one box.

The per-model values (replicas, queue-delay target, CPUs, memory) are defaults: a model's or
graph's `[cluster]` table in its config wins. The single box never reads this section.
"""

from __future__ import annotations

from dataclasses import dataclass

from bedside.settings.fields import option


@dataclass(frozen=True)
class ClusterSettings:
    address: str = option("", "Ray cluster to join (ray://HOST:PORT or auto); empty: a Ray instance of this process")
    host: str = option(
        "127.0.0.1", "interface of Ray Serve's HTTP proxy (beyond loopback: security.tls_* and auth, as a box)"
    )
    http_port: int = option(
        8000, "OIP v2 REST port at the Ray proxy (the box's default: clients do not change)", 1, 65535
    )
    grpc_port: int = option(
        -1,
        "OIP v2 gRPC port at Ray Serve's gRPC proxy, which listens on every interface without TLS "
        "(Ray offers neither): needs security.insecure, for a closed cluster network; -1: no gRPC",
        -1,
        65535,
    )
    min_replicas: int = option(1, "replicas a model keeps at least, unless its [cluster] says otherwise", 0, 1024)
    max_replicas: int = option(2, "replicas a model may scale up to, unless its [cluster] says otherwise", 1, 1024)
    target_queue_ms: float = option(
        5.0, "queue delay a model's replicas aim to stay under; above it they scale up", 0.01, 60_000
    )
    target_ongoing: float = option(4.0, "requests in flight per replica the autoscaler aims for", 0.1, 10_000)
    max_ongoing: int = option(
        16, "requests in flight per replica at most; more wait at the front, STAT first", 1, 10_000
    )
    replica_cpus: float = option(
        0.2, "CPUs a replica reserves in Ray (a small model needs a fraction of a core)", 0.01, 256
    )
    replica_base_mb: int = option(
        350, "memory a replica process takes before its models, MiB (placement reserves it)", 16, 1 << 20
    )
    model_memory_factor: float = option(
        3.0, "a replica reserves this many times its model files' size on top of the base", 1, 100
    )
    upscale_delay_s: float = option(2.0, "how long the queue delay must stay high before a replica is added", 0, 3600)
    downscale_delay_s: float = option(20.0, "how long it must stay low before a replica is removed", 0, 86_400)
    metrics_interval_s: float = option(0.5, "how often replicas report their queue delay to the autoscaler", 0.1, 60)
    front_replicas: int = option(1, "replicas of the front (the ingress that orders STAT first)", 1, 256)
    front_queue: int = option(
        1024, "requests one model may have waiting at the front; more are refused (429)", 1, 10**6
    )
    deploy_timeout_s: float = option(
        180.0, "longest `bedside cluster up` waits for every deployment to run before it says which did not", 1, 3600
    )
    retries: int = option(2, "times a request whose replica died is sent again (inference is idempotent)", 0, 10)
