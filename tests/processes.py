"""The processes of a run, read from /proc (Linux), for the tests that stop or kill one: which it
started, and which are left once it has ended."""

import time
from pathlib import Path


def stat_fields(pid):
    """/proc/<pid>/stat's fields after the command's name (state first), or None once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def processes_in_session(session):
    """The pids of the live processes (not zombies) of the session `session`: a run started with
    start_new_session=True, and every process it or its children started, wherever they were reparented."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(stat.parent.name)
        if fields and fields[3] == str(session) and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def processes_left(session, grace_seconds=30):
    """The session's processes still alive after up to `grace_seconds`: multiprocessing's resource
    tracker and fork server end a moment after the process that started them."""
    deadline = time.monotonic() + grace_seconds
    while processes_in_session(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_in_session(session)


def child_processes(pid):
    """The pids of the processes whose parent is `pid`."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            children.append(int(status.parent.name))
    return children


def spawned_workers(pid):
    """The pids of the processes `pid` started through multiprocessing's spawn, in the order they
    started (the launcher starts worker 0 first)."""
    workers = []
    for child in child_processes(pid):
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat_fields(child)
        if fields and b"multiprocessing.spawn" in command:
            workers.append((int(fields[19]), child))
    return [child for _, child in sorted(workers)]
