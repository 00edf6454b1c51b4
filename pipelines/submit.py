"""Submit the compiled pipeline to a Kubeflow Pipelines API: upload it (a new version when it exists),
find or create the experiment, start a run, and optionally wait for it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from healnet.errors import HEALNetError

HEALTHZ_PATH = "/apis/v2beta1/healthz"


class SubmitError(HEALNetError, RuntimeError):
    """The KFP API cannot be reached, refuses the credentials, or rejects a request."""


@dataclass(frozen=True)
class Submission:
    pipeline_id: str
    version_id: str
    experiment_id: str
    run_id: str
    state: str | None  # the final state when waited for


def _explain(status: int, what: str, host: str, namespace: str | None) -> str:
    if status == 401:
        return f"{what}: authentication failed (HTTP 401) at {host}; pass a valid --token (or $KFP_TOKEN)"
    if status == 403:
        return (
            f"{what}: permission denied (HTTP 403) at {host} for namespace {namespace or '(default)'}; "
            "check the token's user is a contributor of that Kubeflow profile, or pass --namespace"
        )
    if status == 404:
        return f"{what}: not found (HTTP 404) at {host}; check the namespace and that HOST is the KFP API endpoint"
    return f"{what}: HTTP {status} from {host}"


def check_health(host: str, token: str | None, namespace: str | None, timeout_s: float = 10.0) -> dict:
    """GET the healthz endpoint; turns connection and auth problems into a clear `SubmitError`."""
    request = urllib.request.Request(host.rstrip("/") + HEALTHZ_PATH)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        raise SubmitError(_explain(error.code, "health check", host, namespace)) from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SubmitError(f"cannot reach the KFP API at {host}: {reason}") from error


@contextmanager
def _api_errors(what: str, host: str, namespace: str | None):
    from kfp_server_api import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as error:
        detail = f" ({error.body.strip()[:300]})" if error.body else ""
        raise SubmitError(_explain(error.status, what, host, namespace) + detail) from error
    except HTTPError as error:
        raise SubmitError(f"{what}: lost the connection to the KFP API at {host}: {error}") from error


def _upload(client, package: Path, name: str, namespace: str | None) -> tuple[str, str]:
    """Upload the package as pipeline `name`, or as a new version when that pipeline exists."""
    matching = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    existing = client.list_pipelines(filter=matching, namespace=namespace).pipelines or []
    if existing:
        pipeline_id = existing[0].pipeline_id
        version_name = f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        version = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id)
        return pipeline_id, version.pipeline_version_id
    pipeline = client.upload_pipeline(str(package), pipeline_name=name, namespace=namespace)
    versions = client.list_pipeline_versions(pipeline.pipeline_id).pipeline_versions or []
    if not versions:
        raise SubmitError(f"pipeline {name} was uploaded ({pipeline.pipeline_id}) but has no version")
    return pipeline.pipeline_id, versions[0].pipeline_version_id


def submit(
    package: Path,
    host: str,
    arguments: dict,
    pipeline_name: str,
    experiment: str,
    namespace: str | None = None,
    run_name: str | None = None,
    token: str | None = None,
    wait_timeout_s: int | None = None,
) -> Submission:
    """Upload `package` and start a run with `arguments`; with `wait_timeout_s`, wait for its end."""
    import kfp

    check_health(host, token, namespace)
    with _api_errors("connecting", host, namespace), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works", category=FutureWarning)
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
    with _api_errors("uploading the pipeline", host, namespace):
        pipeline_id, version_id = _upload(client, package, pipeline_name, namespace)
    with _api_errors(f"finding or creating experiment {experiment!r}", host, namespace):
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    name = run_name or f"{pipeline_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    with _api_errors("creating the run", host, namespace):
        run = client.run_pipeline(
            experiment_id, name, params=arguments, pipeline_id=pipeline_id, version_id=version_id
        )
    state = None
    if wait_timeout_s:
        with _api_errors("waiting for the run", host, namespace):
            state = client.wait_for_run_completion(run.run_id, timeout=wait_timeout_s, sleep_duration=5).state
    return Submission(pipeline_id, version_id, experiment_id, run.run_id, state)
