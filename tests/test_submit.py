"""`python -m pipelines submit` against a small fake Kubeflow Pipelines API on 127.0.0.1."""

import json
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipelines.__main__ import main as pipelines_main

API = "/apis/v2beta1"


class FakeKfpApi:
    """The endpoints kfp.Client uses for upload → experiment → run → wait, with bearer-token auth and
    a set of namespaces the caller may use."""

    def __init__(self, token: str | None = None, namespaces: frozenset = frozenset({"team-a"})):
        self.token = token
        self.namespaces = namespaces
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.packages: dict[str, str] = {}  # version id -> uploaded YAML
        self.experiments: list[dict] = []
        self.runs: dict[str, dict] = {}
        self.app = Starlette(
            routes=[
                Route(f"{API}/healthz", self.healthz),
                Route(f"{API}/pipelines", self.list_pipelines),
                Route(f"{API}/pipelines/upload", self.upload, methods=["POST"]),
                Route(f"{API}/pipelines/upload_version", self.upload_version, methods=["POST"]),
                Route(f"{API}/pipelines/{{pipeline_id}}/versions", self.list_versions),
                Route(f"{API}/experiments", self.experiments_endpoint, methods=["GET", "POST"]),
                Route(f"{API}/runs", self.create_run, methods=["POST"]),
                Route(f"{API}/runs/{{run_id}}", self.get_run),
            ]
        )

    def refuse(self, request: Request, namespace: str | None = None) -> JSONResponse | None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": "Unauthenticated", "code": 16}, status_code=401)
        namespace = namespace or request.query_params.get("namespace")
        if namespace and namespace not in self.namespaces:
            return JSONResponse(
                {"error": f"user cannot access namespace {namespace}", "code": 7}, status_code=403
            )
        return None

    async def healthz(self, request: Request):
        return self.refuse(request) or JSONResponse({"multi_user": False})

    async def list_pipelines(self, request: Request):
        if refused := self.refuse(request):
            return refused
        wanted = json.loads(request.query_params["filter"])["predicates"][0]["stringValue"]
        found = [p for p in self.pipelines.values() if p["display_name"] == wanted]
        return JSONResponse({"pipelines": found, "total_size": len(found)} if found else {})

    async def _add_version(self, request: Request, pipeline_id: str, name: str) -> dict:
        form = await request.form()
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": uuid.uuid4().hex, "display_name": name}
        self.packages[version["pipeline_version_id"]] = (await form["uploadfile"].read()).decode()
        self.versions.setdefault(pipeline_id, []).append(version)
        return version

    async def upload(self, request: Request):
        if refused := self.refuse(request):
            return refused
        name = request.query_params["name"]
        pipeline = {"pipeline_id": uuid.uuid4().hex, "display_name": name, "name": name}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        await self._add_version(request, pipeline["pipeline_id"], name)
        return JSONResponse(pipeline)

    async def upload_version(self, request: Request):
        if refused := self.refuse(request):
            return refused
        params = request.query_params
        return JSONResponse(await self._add_version(request, params["pipelineid"], params["name"]))

    async def list_versions(self, request: Request):
        versions = self.versions.get(request.path_params["pipeline_id"], [])
        return self.refuse(request) or JSONResponse(
            {"pipeline_versions": versions, "total_size": len(versions)}
        )

    async def experiments_endpoint(self, request: Request):
        if request.method == "GET":
            if refused := self.refuse(request):
                return refused
            wanted = json.loads(request.query_params["filter"])["predicates"][0]["stringValue"]
            found = [e for e in self.experiments if e["display_name"] == wanted]
            return JSONResponse({"experiments": found} if found else {})
        body = await request.json()
        if refused := self.refuse(request, body.get("namespace")):
            return refused
        experiment = {**body, "experiment_id": uuid.uuid4().hex}
        self.experiments.append(experiment)
        return JSONResponse(experiment)

    async def create_run(self, request: Request):
        if refused := self.refuse(request):
            return refused
        run = {**(await request.json()), "run_id": uuid.uuid4().hex, "state": "PENDING"}
        self.runs[run["run_id"]] = run
        return JSONResponse(run)

    async def get_run(self, request: Request):
        if refused := self.refuse(request):
            return refused
        return JSONResponse({**self.runs[request.path_params["run_id"]], "state": "SUCCEEDED"})


@contextmanager
def serving(api: FakeKfpApi):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def submit(host: str, *extra: str) -> int:
    return pipelines_main(["submit", "--host", host, "--param", "cohort_dir=/data/demo", *extra])


def test_submit_uploads_the_package_and_runs_it_with_the_parameters(capsys):
    api = FakeKfpApi(token="s3cret")
    with serving(api) as host:
        code = submit(
            host,
            "--token=s3cret",
            "--namespace=team-a",
            "--experiment=healnet-ci",
            "--param=epochs=5",
            "--param=dry_run=true",
            "--param=gpu_count=2",
            "--wait",
        )
    printed = capsys.readouterr().out
    assert code == 0, printed
    [pipeline] = api.pipelines.values()
    assert pipeline["display_name"] == "healnet-training"
    [version] = api.versions[pipeline["pipeline_id"]]
    package, _ = yaml.safe_load_all(api.packages[version["pipeline_version_id"]])
    assert package["pipelineInfo"]["name"] == "healnet-training"
    resources = package["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"  # the compile-time option travelled
    [experiment] = api.experiments
    assert experiment["display_name"] == "healnet-ci" and experiment["namespace"] == "team-a"
    [run] = api.runs.values()
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert run["runtime_config"]["parameters"] == {"cohort_dir": "/data/demo", "epochs": 5, "dry_run": True}
    assert f"started run {run['run_id']}" in printed and "run finished: SUCCEEDED" in printed


def test_a_second_submit_uploads_a_new_version_of_the_same_pipeline(capsys):
    api = FakeKfpApi()
    with serving(api) as host:
        assert submit(host) == 0
        assert submit(host) == 0
    [pipeline_id] = api.pipelines
    assert len(api.versions[pipeline_id]) == 2 and len(api.experiments) == 1
    versions_run = [run["pipeline_version_reference"]["pipeline_version_id"] for run in api.runs.values()]
    assert versions_run == [version["pipeline_version_id"] for version in api.versions[pipeline_id]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "authentication failed (HTTP 401)"),
        (("--token=wrong",), "authentication failed (HTTP 401)"),
        (("--token=s3cret", "--namespace=team-b"), "permission denied (HTTP 403)"),
    ],
)
def test_auth_and_namespace_problems_are_explained(capsys, extra, message):
    api = FakeKfpApi(token="s3cret")
    with serving(api) as host:
        assert submit(host, *extra) == 1
    error = capsys.readouterr().err
    assert message in error
    assert not api.runs


def test_namespace_error_names_the_namespace(capsys):
    with serving(FakeKfpApi()) as host:
        assert submit(host, "--namespace=team-b") == 1
    assert "namespace team-b" in capsys.readouterr().err


def test_an_unreachable_host_is_reported(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it
    assert submit(f"http://127.0.0.1:{port}") == 1
    assert f"cannot reach the KFP API at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_cohort_dir_is_required(capsys):
    assert pipelines_main(["submit", "--host", "http://127.0.0.1:9"]) == 2
    assert "cohort_dir" in capsys.readouterr().err
