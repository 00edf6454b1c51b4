"""Resident memory of a live server's processes, read from Linux's /proc (tests and benchmarks only)."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # the command name is in parentheses and may hold spaces: the parent pid follows its closing one
        parent = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by `pid`."""
    children, found, queue = _children_of(), [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def command_line(pid: int) -> str:
    return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def listening_server(port: int) -> int:
    """The pid of the `bentoml serve` started with `--port port`."""
    for cmdline in PROC.glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"serve" in words
            and b"--port" in words
            and words[words.index(b"--port") + 1] == str(port).encode()
        ):
            return int(cmdline.parent.name)
    raise LookupError(f"no `bentoml serve --port {port}` is running")


def service_workers(port: int) -> list[int]:
    """The service worker processes of the `bentoml serve` on `port` (those that load the model)."""
    workers = [pid for pid in descendants(listening_server(port)) if "worker" in command_line(pid)]
    if not workers:
        raise LookupError(f"the server on port {port} has no worker process")
    return workers


def status_mib(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM, ...) in MiB."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> None:
    """Start a new peak: VmHWM becomes the current VmRSS (Linux's clear_refs 5)."""
    (PROC / str(pid) / "clear_refs").write_text("5")
