"""Submit the compiled pipeline to a Kubeflow Pipelines API: upload it as the version named after the code
and the package (reused when it exists), find or create the experiment, start a run of that version, and
optionally wait for it."""

from __future__ import annotations

import hashlib
import json
import re
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
class PipelineVersion:
    pipeline_id: str
    version_id: str
    version_name: str
    reused: bool  # the version already existed, with this very package


@dataclass(frozen=True)
class Submission:
    version: PipelineVersion
    experiment_id: str
    run_id: str
    state: str | None  # the final state when waited for


VERSION_NAMING = "VERSION-gCOMMIT[-dirty]-specDIGEST, e.g. 0.3.0-g1a2b3c4d5e6f-spec0e9b5513"


def pipeline_version_name(package: Path) -> str:
    """The version `package` is uploaded as: the package version, the commit (`git_sha`, "-dirty" kept) and
    the start of the package's sha256, e.g. "0.3.0-g1a2b3c4d5e6f-spec0e9b5513". The digest makes one name
    mean one package: compile-time options and image variables change the package but not the commit, and
    a dirty tree changes it without a new commit. Lower case, digits, "-" and "." only, because KFP's
    Kubernetes-native store names objects after versions (no "+")."""
    from components.support import git_sha
    from healnet import __version__

    sha = git_sha()
    commit = sha.removesuffix("-dirty")
    code = f"g{commit[:12]}" if re.fullmatch(r"[0-9a-f]{7,40}", commit) else commit
    dirty = "-dirty" if sha.endswith("-dirty") else ""
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:8]
    name = f"{__version__}-{code}{dirty}-spec{digest}".lower()
    return re.sub(r"[^a-z0-9.-]+", "-", name)


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
def api_errors(what: str, host: str, namespace: str | None):
    from kfp_server_api import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as error:
        detail = f" ({error.body.strip()[:300]})" if error.body else ""
        raise SubmitError(_explain(error.status, what, host, namespace) + detail) from error
    except HTTPError as error:
        raise SubmitError(f"{what}: lost the connection to the KFP API at {host}: {error}") from error


def _equals(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def find_pipeline_id(client, pipeline_name: str, namespace: str | None) -> str | None:
    """The id of the pipeline named `pipeline_name` in `namespace`, or None when there is none."""
    existing = client.list_pipelines(filter=_equals(pipeline_name), namespace=namespace).pipelines or []
    return existing[0].pipeline_id if existing else None


def upload_version(client, package: Path, pipeline_name: str, namespace: str | None) -> PipelineVersion:
    """Upload `package` as version `pipeline_version_name(package)` of pipeline `pipeline_name`, creating
    the pipeline when missing; a version of that name already holds this package and is reused."""
    version_name = pipeline_version_name(package)
    pipeline_id = find_pipeline_id(client, pipeline_name, namespace)
    if pipeline_id:
        same_name = client.list_pipeline_versions(pipeline_id, filter=_equals(version_name)).pipeline_versions
        if same_name:
            return PipelineVersion(pipeline_id, same_name[0].pipeline_version_id, version_name, reused=True)
    else:
        # KFP's upload creates a pipeline with a first version named after the pipeline; the named
        # version goes beside it, so that runs and schedules refer to a name that says what they run.
        pipeline_id = client.upload_pipeline(
            str(package), pipeline_name=pipeline_name, namespace=namespace
        ).pipeline_id
    version = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id)
    return PipelineVersion(pipeline_id, version.pipeline_version_id, version_name, reused=False)


def connect(host: str, token: str | None, namespace: str | None):
    """A `kfp.Client` for `host`, after a health check that turns connection and auth problems into a clear
    `SubmitError`."""
    import kfp

    check_health(host, token, namespace)
    with api_errors("connecting", host, namespace), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works", category=FutureWarning)
        return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)


def find_or_create_experiment(client, experiment: str, host: str, namespace: str | None) -> str:
    """The id of experiment `experiment` in `namespace` (kfp's create_experiment returns an existing one)."""
    with api_errors(f"finding or creating experiment {experiment!r}", host, namespace):
        return client.create_experiment(experiment, namespace=namespace).experiment_id


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
    """Upload `package` (`upload_version`) and start a run of that version with `arguments`; with
    `wait_timeout_s`, wait for its end."""
    client = connect(host, token, namespace)
    with api_errors("uploading the pipeline", host, namespace):
        version = upload_version(client, package, pipeline_name, namespace)
    experiment_id = find_or_create_experiment(client, experiment, host, namespace)
    name = run_name or f"{pipeline_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    with api_errors("creating the run", host, namespace):
        run = client.run_pipeline(
            experiment_id,
            name,
            params=arguments,
            pipeline_id=version.pipeline_id,
            version_id=version.version_id,
        )
    state = None
    if wait_timeout_s:
        with api_errors("waiting for the run", host, namespace):
            state = client.wait_for_run_completion(run.run_id, timeout=wait_timeout_s, sleep_duration=5).state
    return Submission(version, experiment_id, run.run_id, state)
