"""Development tools shared by the tests, the benchmarks and the scripts: a small model trained on random
data and its requests (`demo`), a live `bentoml serve` of it in a temporary registry (`live_server`), a
real Prometheus scraping it as the Kubernetes manifests configure it (`monitoring_stack`), and the
dashboard's and alerts' PromQL (`k8s_queries`). Nothing in the library, the pipeline or the service
imports this package."""
