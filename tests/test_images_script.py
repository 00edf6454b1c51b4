"""scripts/images.sh and scripts/pipeline_in_images.py without an engine: the checks that need buildah and
podman run in CI (`make images-test`), not here."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "images.sh"


def load_driver():
    spec = importlib.util.spec_from_file_location(
        "pipeline_in_images", REPO / "scripts" / "pipeline_in_images.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses_and_refuses_an_unknown_mode():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT), "push"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


def test_the_steps_run_locked_down_as_the_images_user():
    pytest.importorskip("docker")
    driver = load_driver()
    runner = driver.step_runner(Path("/data/cohort"), Path("/data/registry"), driver.STEP_USER, "1g")
    run_args = runner.container_run_args
    assert run_args["user"] == "10001:10001" and run_args["read_only"] is True
    assert run_args["network_mode"] == "none" and set(run_args["tmpfs"]) == {"/tmp"}
    cohort, registry = run_args["mounts"]
    assert (cohort["Source"], cohort["Target"], cohort["ReadOnly"]) == ("/data/cohort", "/data/cohort", True)
    assert (registry["Target"], registry["ReadOnly"]) == ("/data/registry", False)


def test_the_step_user_is_the_component_images_user():
    dockerfile = (REPO / "components" / "Dockerfile").read_text()
    assert f"USER {load_driver().STEP_USER.split(':')[0]}" in dockerfile


def test_the_driver_needs_the_image_names_and_an_engine(monkeypatch, tmp_path, capsys):
    for name in ("HEALNET_IMAGE", "HEALNET_GPU_IMAGE", "DOCKER_HOST"):
        monkeypatch.delenv(name, raising=False)
    arguments = ["--cohort", str(tmp_path), "--registry", str(tmp_path), "--pipeline-root", str(tmp_path)]
    assert load_driver().main(arguments) == 2
    assert "HEALNET_IMAGE" in capsys.readouterr().err


class FakeContainer:
    def __init__(self, status: int):
        self.status, self.removed = status, False

    def logs(self, stream: bool, follow: bool):
        return iter([b"step output\n"])

    def wait(self):
        return {"StatusCode": self.status}

    def remove(self, force: bool):
        self.removed = force


class FakeClient:
    def __init__(self, container: FakeContainer):
        self.containers, self.container, self.run_args = self, container, None

    def run(self, **run_args):
        self.run_args = run_args
        return self.container


@pytest.mark.parametrize("status", [0, 1])
def test_a_steps_exit_status_is_read_before_its_container_is_removed(status, capsys):
    # kfp.local's own runner starts containers with auto_remove and counts one already gone as succeeded
    client = FakeClient(FakeContainer(status))
    code = load_driver().run_step_container(client, "image", ["sh"], {"/root": {}}, user="10001:10001")
    assert code == status and client.container.removed and "step output" in capsys.readouterr().out
    assert "auto_remove" not in client.run_args and client.run_args["user"] == "10001:10001"
