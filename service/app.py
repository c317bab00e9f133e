"""``build_app``: the one builder of the Serve application (CLI, ``serve build``, ``serve deploy``).

    serve run service.app:build_app gpus=2 model=/models/Wan2.1-T2V-1.3B
    # or in a Serve config file: import_path: service.app:build_app, args: {config_file: wanserve.yaml}

The application is three deployments composed by handles:
``Ingress`` (HTTP, CPU) -> ``JobQueue`` (durable queue + dispatcher, one replica) -> ``EngineReplica``
(one per model instance: a placement group of N ``GenerationWorker`` actors).
"""
from __future__ import annotations

from typing import Any

from ray import serve

from service.config import ServiceSettings
from service.dispatcher import DRAIN_MARGIN_S, JobQueueService
from service.engine import QUEUE_DEPLOYMENT, EngineReplica, engine_options
from service.ingress import INGRESS_OTHER_REQUESTS, Ingress
from service.logs import serve_logging_config
from service.webhooks import signing_key


def build_app(args: "dict[str, Any] | ServiceSettings | None" = None) -> serve.Application:
    settings = ServiceSettings.coerce(args)
    settings.variant_spec  # fail here, not in a replica, on an unknown variant
    settings.resolved_auth_token()  # and on an unreadable token file
    webhook_secret = settings.resolved_webhook_secret()  # or webhook secret file
    if webhook_secret:
        signing_key(webhook_secret)  # and on a "whsec_" secret that is not base64
    settings.parallel_layout()  # and on degrees that cannot lay out the workers and heads
    settings.warmup_requests("/")  # and on warm-up shapes the variant cannot make
    plain = settings.to_args()
    logging_config = serve_logging_config(settings.log_format)
    control_plane = {"num_cpus": 0}
    if settings.control_plane_resource:
        control_plane["resources"] = {settings.control_plane_resource: 0.001}
    engine = serve.deployment(EngineReplica).options(
        **engine_options(settings), logging_config=logging_config).bind(plain)
    queue = serve.deployment(JobQueueService).options(
        name=QUEUE_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000, ray_actor_options=control_plane,
        health_check_period_s=settings.health_check_period_s, logging_config=logging_config,
        # It outlives the engines' drain, to record the outcomes of the jobs they finish meanwhile.
        graceful_shutdown_timeout_s=settings.drain_timeout_s + DRAIN_MARGIN_S,
    ).bind(plain, engine)
    ingress = serve.deployment(Ingress).options(
        # Event streams stay open for a job's whole life: room for max_event_streams of them, and as
        # many other requests beside.
        name="Ingress", max_ongoing_requests=INGRESS_OTHER_REQUESTS + settings.max_event_streams,
        ray_actor_options=control_plane, logging_config=logging_config,
    ).bind(plain, queue)
    return ingress
