"""Run the training pipeline's real KFP components inside the step images, as a cluster runs them.

kfp.local's DockerRunner starts every step in its image ($HEALNET_IMAGE for the CPU steps,
$HEALNET_GPU_IMAGE for `train`; both read when the components are imported) through a Docker-compatible
API ($DOCKER_HOST: a Docker engine, or `podman system service`, which scripts/images.sh starts). Each step
runs as a non-root user with a read-only root filesystem, a tmpfs at /tmp and no network, with the cohort
bind-mounted read-only and the model registry read-write (each at its host path, like the pipeline root,
which kfp.local mounts itself). Exit status 0 only when the run succeeded, the gate promoted the model and
every output file was written by the steps' user.

    python scripts/pipeline_in_images.py --cohort build/images/demo --registry build/images/registry \\
        --pipeline-root build/images/kfp --param epochs=5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STEP_USER = "10001:10001"  # the images' `healnet` user (components/Dockerfile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cohort", type=Path, required=True, help="canonical cohort folder (mounted read-only)"
    )
    parser.add_argument(
        "--registry", type=Path, required=True, help="model registry folder (mounted read-write)"
    )
    parser.add_argument("--pipeline-root", type=Path, required=True, help="where the task outputs go")
    parser.add_argument("--user", default=STEP_USER, help="UID:GID the steps run as (default: %(default)s)")
    parser.add_argument("--tmpfs-size", default="2g", help="size of each step's /tmp (default: %(default)s)")
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="pipeline parameter, repeatable"
    )
    parser.add_argument("--summary", type=Path, help="write the run's outcome here as JSON")
    return parser


def step_runner(cohort: Path, registry: Path, user: str, tmpfs_size: str):
    """A DockerRunner with the restrictions of a locked-down cluster pod."""
    from docker.types import Mount
    from kfp import local

    return local.DockerRunner(
        user=user,
        read_only=True,
        tmpfs={"/tmp": f"rw,size={tmpfs_size},mode=1777"},
        network_mode="none",
        mounts=[
            Mount(target=str(cohort), source=str(cohort), type="bind", read_only=True),
            Mount(target=str(registry), source=str(registry), type="bind", read_only=False),
        ],
    )


def run_step_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """kfp.local's `run_docker_container` (kfp 2.17.3), but the container is removed after its exit status
    is read: kfp.local starts it with auto_remove and counts a container that is gone before `wait()` as
    succeeded, which masks a failed step (seen with podman: a failed `validate` reported SUCCESS)."""
    container = client.containers.run(
        image=image, command=command, detach=True, stdout=True, stderr=True, volumes=volumes, **run_args
    )
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(), end="")
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)


def foreign_files(root: Path, uid: int) -> list[str]:
    """Files under `root` not owned by `uid` (the copies of the reports that run_local makes are left out)."""
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and path.stat().st_uid != uid and path.parent != root
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("HEALNET_IMAGE", "HEALNET_GPU_IMAGE", "DOCKER_HOST"):
        if not os.environ.get(name):
            print(f"error: ${name} is not set", file=sys.stderr)
            return 2
    from kfp.local import docker_task_handler

    from pipelines.local import run_local
    from pipelines.options import parse_params
    from pipelines.pipeline import build_pipeline, pipeline_inputs

    cohort, registry = args.cohort.resolve(), args.registry.resolve()
    options, arguments = parse_params(args.param, pipeline_inputs(build_pipeline()))
    arguments.update(cohort_dir=str(cohort), registry_dir=str(registry))
    print(
        f"steps in {os.environ['HEALNET_IMAGE']} (train in {os.environ['HEALNET_GPU_IMAGE']}) as {args.user}, "
        f"read-only root, tmpfs /tmp, no network; cohort {cohort} (read-only), registry {registry}",
        flush=True,
    )
    runner = step_runner(cohort, registry, args.user, args.tmpfs_size)
    docker_task_handler.run_docker_container = run_step_container
    result = run_local(arguments, args.pipeline_root, options, stream_logs=True, runner=runner)

    problems = []
    if not result.succeeded:
        problems.append(f"the run failed: {result.error}")
    if result.decision != "promote" or not result.model_tag:
        problems.append(f"the gate decided {result.decision!r} and promoted {result.model_tag!r}")
    not_the_steps = foreign_files(result.run_dir, int(args.user.split(":")[0]))
    if not_the_steps:
        problems.append(f"{len(not_the_steps)} output files not written by {args.user}: {not_the_steps[:3]}")
    outcome = {
        "run_dir": str(result.run_dir),
        "succeeded": not problems,
        "metrics": result.metrics,
        "decision": result.decision,
        "model_tag": result.model_tag,
        "problems": problems,
    }
    print(json.dumps(outcome, indent=2))
    if args.summary:
        args.summary.write_text(json.dumps(outcome, indent=2))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
