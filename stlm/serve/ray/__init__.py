"""``stlm serve --replicas N``: the single-process server, replicated and autoscaled by Ray Serve.

Each replica is one Ray actor running the very app of ``stlm serve`` (:func:`stlm.serve.app.create_app`
over its own scheduler and KV cache); Ray's HTTP proxy routes requests to replicas and streams
their responses. Ray itself is optional (``pip install 'stlm[ray]'``) and imported only when a
deployment is built. Modules: :mod:`~stlm.serve.ray.deployment` (options, replica, application
builder for ``serve run``/KubeRay), :mod:`~stlm.serve.ray.driver` (the CLI: start or join Ray,
serve until a signal), :mod:`~stlm.serve.ray.proxy` (lost replicas → retryable 503),
:mod:`~stlm.serve.ray.metrics` (per-replica metrics through Ray's metrics agent).
"""

from stlm.serve.ray.deployment import RayOptions, bind, build_app, deployment_options, parse_autoscale
from stlm.serve.ray.driver import run_ray_server, serve_on_ray

__all__ = ["RayOptions", "bind", "build_app", "deployment_options", "parse_autoscale", "run_ray_server", "serve_on_ray"]
