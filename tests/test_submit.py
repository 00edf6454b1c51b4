"""`python -m pipelines submit` and `schedule` against a small fake Kubeflow Pipelines API on 127.0.0.1."""

import hashlib
import json
import socket
import subprocess
import sys
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

from healnet import __version__
from pipelines.__main__ import main as pipelines_main

API = "/apis/v2beta1"


class FakeKfpApi:
    """The endpoints kfp.Client uses for upload → experiment → run → wait and for recurring runs
    (create, list, disable), with bearer-token auth and a set of namespaces the caller may use."""

    def __init__(self, token: str | None = None, namespaces: frozenset = frozenset({"team-a"})):
        self.token = token
        self.namespaces = namespaces
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.packages: dict[str, str] = {}  # version id -> uploaded YAML
        self.experiments: list[dict] = []
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
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
                Route(f"{API}/recurringruns", self.recurring_runs_endpoint, methods=["GET", "POST"]),
                Route(f"{API}/recurringruns/{{recurring_run_id}}:disable", self.disable, methods=["POST"]),
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
        if "filter" in request.query_params:
            wanted = json.loads(request.query_params["filter"])["predicates"][0]["stringValue"]
            versions = [v for v in versions if v["display_name"] == wanted]
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

    async def recurring_runs_endpoint(self, request: Request):
        if request.method == "GET":
            if refused := self.refuse(request):
                return refused
            # The v2beta1 API's list field is camelCase, unlike the others.
            return JSONResponse({"recurringRuns": list(self.recurring_runs.values())})
        if refused := self.refuse(request):
            return refused
        body = await request.json()
        status = "ENABLED" if body["mode"] == "ENABLE" else "DISABLED"
        recurring_run = {**body, "recurring_run_id": uuid.uuid4().hex, "status": status}
        self.recurring_runs[recurring_run["recurring_run_id"]] = recurring_run
        return JSONResponse(recurring_run)

    async def disable(self, request: Request):
        if refused := self.refuse(request):
            return refused
        recurring_run = self.recurring_runs.get(request.path_params["recurring_run_id"])
        if recurring_run is None:
            return JSONResponse({"error": "recurring run not found", "code": 5}, status_code=404)
        recurring_run.update(mode="DISABLE", status="DISABLED")
        return JSONResponse({})


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
    first, version = api.versions[pipeline["pipeline_id"]]  # KFP's upload names the first one itself
    assert first["display_name"] == "healnet-training" and version["display_name"] != first["display_name"]
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
    assert f"started run {run['run_id']} of version {version['display_name']}" in printed
    assert "run finished: SUCCEEDED" in printed


def test_the_version_is_named_after_the_package_version_the_commit_and_the_package(monkeypatch):
    monkeypatch.setenv("HEALNET_GIT_SHA", "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d-dirty")
    api = FakeKfpApi()
    with serving(api) as host:
        assert submit(host) == 0
    [pipeline_id] = api.pipelines
    version = api.versions[pipeline_id][-1]
    digest = hashlib.sha256(api.packages[version["pipeline_version_id"]].encode()).hexdigest()
    assert version["display_name"] == f"{__version__}-g1a2b3c4d5e6f-dirty-spec{digest[:8]}"


def test_the_same_package_reuses_its_version_and_another_package_gets_a_new_one(capsys):
    api = FakeKfpApi()
    with serving(api) as host:
        assert submit(host) == 0
        assert submit(host) == 0
        assert "reused pipeline" in capsys.readouterr().out
        assert submit(host, "--param=gpu_count=2") == 0  # a compile-time option: another package
    [pipeline_id] = api.pipelines
    _, named, other = api.versions[pipeline_id]
    assert named["display_name"] != other["display_name"] and len(api.experiments) == 1
    versions_run = [run["pipeline_version_reference"]["pipeline_version_id"] for run in api.runs.values()]
    assert versions_run == [named["pipeline_version_id"]] * 2 + [other["pipeline_version_id"]]


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


def schedule(host: str, *extra: str) -> int:
    return pipelines_main(["schedule", "--host", host, *extra])


def test_schedule_creates_a_recurring_run_pinned_to_the_uploaded_version(capsys):
    api = FakeKfpApi()
    with serving(api) as host:
        code = schedule(
            host, "--cron", "0 0 3 * * 1", "--param", "recipe=tcga", "--param", "cohort_dir=/data/demo"
        )
    printed = capsys.readouterr().out
    assert code == 0, printed
    [pipeline_id] = api.pipelines
    version = api.versions[pipeline_id][-1]
    [recurring_run] = api.recurring_runs.values()
    assert recurring_run["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert recurring_run["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert recurring_run["max_concurrency"] == 1 and recurring_run["no_catchup"] is True
    assert recurring_run["runtime_config"]["parameters"] == {"recipe": "tcga", "cohort_dir": "/data/demo"}
    assert recurring_run["mode"] == "ENABLE"
    assert recurring_run["experiment_id"] == api.experiments[0]["experiment_id"]
    assert f"created recurring run {recurring_run['recurring_run_id']}" in printed
    assert f"pinned to version {version['display_name']} (id {version['pipeline_version_id']})" in printed
    assert not api.runs  # the scheduler starts the runs, not the command


def test_schedules_are_listed_with_their_version_and_disabled(capsys):
    api = FakeKfpApi()
    with serving(api) as host:
        assert schedule(host, "list") == 0
        assert "no recurring runs of pipeline healnet-training" in capsys.readouterr().out
        create = ("--cron", "0 30 2 * * *", "--param", "cohort_dir=/data/demo")
        assert schedule(host, *create, "--name=nightly") == 0
        assert schedule(host, *create, "--name=catching-up", "--catchup", "--max-concurrency=2") == 0
        assert "reused pipeline" in capsys.readouterr().out
        nightly, catching_up = api.recurring_runs.values()
        assert catching_up["no_catchup"] is False and catching_up["max_concurrency"] == 2
        assert schedule(host, "disable", nightly["recurring_run_id"]) == 0
        assert schedule(host, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    [pipeline_id] = api.pipelines
    version_name = api.versions[pipeline_id][-1]["display_name"]
    cron = 'cron "0 30 2 * * *"'
    assert lines == [
        f"disabled recurring run {nightly['recurring_run_id']}",
        f"{nightly['recurring_run_id']}  nightly  {cron}  DISABLED  version {version_name}",
        f"{catching_up['recurring_run_id']}  catching-up  {cron}  ENABLED  version {version_name}",
    ]


def test_disabling_an_unknown_recurring_run_is_reported(capsys):
    with serving(FakeKfpApi()) as host:
        assert schedule(host, "disable", "no-such-id") == 1
    assert "disabling recurring run no-such-id: not found (HTTP 404)" in capsys.readouterr().err


def test_a_five_field_cron_is_refused_in_one_line():
    command = [sys.executable, "-m", "pipelines", "schedule", "--host", "http://127.0.0.1:9"]
    command += ["--cron", "0 3 * * 1", "--param", "cohort_dir=/data/demo"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.splitlines() == [
        "error: --cron needs 6 fields (seconds minutes hours day-of-month month day-of-week), "
        'got 5: "0 3 * * 1"; KFP\'s cron starts with seconds'
    ]


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 0 25 * * 1", 'hours field "25" is outside 0-23'),
        ("0 0 3 * * 7", 'day-of-week field "7" is outside 0-6'),
        ("0 0 3 * * MON-FRI/0", 'day-of-week field "MON-FRI/0" has a step of 0'),
        ("0 0 3 ? ? *", 'month field "?" is not *, N, N-M'),
        ("0 0 5-3 * * *", 'hours field "5-3" runs backwards'),
        ("0 0 3 * JUNE *", 'month field has "JUNE", not a number or a name'),
    ],
)
def test_an_invalid_six_field_cron_is_refused_before_anything_is_sent(capsys, cron, message):
    api = FakeKfpApi()
    with serving(api) as host:
        assert schedule(host, "--cron", cron, "--param", "cohort_dir=/data/demo") == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --cron's ") and message in line
    assert not api.pipelines and not api.recurring_runs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "schedule needs --cron EXPR"),
        (("disable",), "schedule disable ID"),
        (("list", "--cron", "0 0 3 * * 1"), "schedule list takes no --cron"),
    ],
)
def test_a_schedule_command_missing_its_parts_is_refused(capsys, extra, message):
    assert schedule("http://127.0.0.1:9", *extra) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert message in line
