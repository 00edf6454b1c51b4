"""BentoML serving of the champion HEALNet model with Prometheus metrics (docs/serving.md).

`serving.service:HEALNetService` is the service; the other modules hold its request schemas,
validation, metrics, ASGI guard and model runtime. Serving imports `healnet`, never the pipelines.
"""
