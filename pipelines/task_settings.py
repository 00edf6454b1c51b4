"""The Kubernetes settings the pipelines' CPU steps share (`kfp.local` ignores them): requests, retries,
and the cohort and registry volumes, applied from one `ClusterOptions`."""

from kfp import kubernetes
from kfp.dsl import PipelineTask

from components.notification import NOTIFY_WEBHOOK_ENV
from pipelines.options import NOTIFY_SECRET_KEY, ClusterOptions


def mount_cohort(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    if options.cohort_pvc:
        kubernetes.mount_pvc(task, pvc_name=options.cohort_pvc, mount_path=options.cohort_mount)
    return task


def mount_registry(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """The BentoML store and champion pointer on shared storage, so serving sees what was promoted."""
    if options.registry_pvc:
        kubernetes.mount_pvc(task, pvc_name=options.registry_pvc, mount_path=options.registry_mount)
        task.set_env_variable("BENTOML_HOME", options.registry_mount)
        task.set_env_variable("HEALNET_REGISTRY_DIR", options.registry_mount)
    return task


def with_retries(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """Retries with exponential back-off for steps that can fail transiently (storage, preemption).

    The steps that see a user's mistakes (fingerprint, ingest, validate) are not retried: what a retry
    would meet again is found there once, before any retried step runs."""
    if options.retries:
        task.set_retry(
            num_retries=options.retries, backoff_duration=options.retry_backoff, backoff_factor=2.0
        )
    return task


def cpu_step(task: PipelineTask, options: ClusterOptions, retry: bool = False) -> PipelineTask:
    task.set_cpu_request(options.step_cpu).set_memory_request(options.step_memory)
    if retry:
        with_retries(task, options)
    return mount_cohort(task, options)


def notify_webhook(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """The webhook URL, a credential, from the notify Secret into the exit handler's environment. Optional:
    a missing Secret leaves the variable unset (the run's end is then only logged) instead of keeping the
    exit handler's pod from starting."""
    if options.notify_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=options.notify_secret,
            secret_key_to_env={NOTIFY_SECRET_KEY: NOTIFY_WEBHOOK_ENV},
            optional=True,
        )
    return task
