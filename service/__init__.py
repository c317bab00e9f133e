"""wanserve's service: the Ray Serve application (HTTP ingress, durable job queue, engine replicas).

Ray/HTTP code only; the tensor work is in ``wan_model``. The builder is ``service.app:build_app``.
"""
