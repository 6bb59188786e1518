"""Real servers for the live tests, started on this machine on loopback (no test functions here).

- :func:`postgres`: a private PostgreSQL cluster (initdb + pg_ctl in a temp dir, as the
  `postgres` user when running as root) on a free port; raises :class:`Unavailable` when none
  can be started (`.ci/run` installs the `postgresql` package with apt-get), which the tests'
  fixtures turn into a loud skip with :func:`skip_loudly`.
- :class:`MlflowServer` / :func:`mlflow_server`: `mlflow server` on a backend store URI with
  proxied artifacts, in a process group of its own, which can be killed and started again
  on the same port and store (a tracking server outage).
- :func:`stop_groups` / :func:`kill_group` / :func:`group_alive`: stop what was started in a
  session of its own, with everything it forked.

Everything here is plain Python (context managers and functions); only :func:`skip_loudly`
touches pytest. tests/ is on ``sys.path`` under pytest, so test files ``import servers``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from glob import glob
from pathlib import Path
from typing import Iterator, NoReturn

BIN = Path(sys.executable).parent
SHORT_TMP = "/tmp" if os.path.isdir("/tmp") else None  # short paths: unix sockets live under them


class Unavailable(RuntimeError):
    """A server this machine cannot run (not installed, cannot start)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} is empty)"


def skip_loudly(what: str, reason: str) -> NoReturn:
    """Skip the current test, and say so where -q does not hide it (warnings summary, stderr)."""
    import pytest

    message = f"{what} SKIPPED: {reason}"
    warnings.warn(message, UserWarning, stacklevel=2)
    print(message, file=sys.__stderr__, flush=True)
    pytest.skip(message)


# --------------------------------------------------------------------------- process groups


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a live member (zombies, which a container's
    init may never reap, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_groups(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM the process groups of processes we started (each in a session of its own, so
    the group id is the process id), as `ray stop` would do to every Ray process of the
    machine; SIGKILL what is left after ``grace_s``."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()
        if not any(group_alive(proc.pid) for proc in procs):
            return
        time.sleep(0.5)
    print(f"[servers] still running {grace_s:.0f} s after SIGTERM, killed: "
          f"{[p.args[:3] for p in procs if group_alive(p.pid)]}", flush=True)
    for proc in procs:
        kill_group(proc)


def kill_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGKILL ``proc``'s process group (a crash: nothing is flushed or closed) and wait
    until no member of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + timeout_s
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A private PostgreSQL server on a free loopback port -> SQLAlchemy URI of database `mlflow`.

    Raises :class:`Unavailable` when PostgreSQL is not installed or does not start.
    """
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        raise Unavailable("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH); "
                          "install it with `apt-get install postgresql` (.ci/run does)")
    bindir = Path(initdb).parent
    user: dict[str, int] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and there is no `postgres` user to run PostgreSQL as") from None
        user = {"user": pw.pw_uid, "group": pw.pw_gid}
    root = Path(tempfile.mkdtemp(prefix="clusterlab-pg-", dir=SHORT_TMP))  # the postgres user must reach it
    if user:
        os.chown(root, user["user"], user["group"])
    data, log, port = root / "data", root / "postgres.log", free_port()

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **user)
        except (OSError, subprocess.TimeoutExpired) as exc:  # binary missing / not executable, hung
            return subprocess.CompletedProcess(list(args), -1, "", f"{type(exc).__name__}: {exc}")

    started = False
    try:
        out = run(str(bindir / "initdb"), "-D", str(data), "-U", "clusterlab", "--auth=trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        if out.returncode != 0:
            raise Unavailable(f"PostgreSQL could not be initialised: initdb exited {out.returncode}: "
                              f"{out.stderr[-1500:]}")
        out = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                  f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if out.returncode != 0:
            raise Unavailable(f"PostgreSQL could not be started: pg_ctl exited {out.returncode}: "
                              f"{out.stdout[-800:]} {tail(log, 1500)}")
        started = True
        out = run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "clusterlab", "mlflow")
        assert out.returncode == 0, f"createdb failed: {out.stderr}"
        yield f"postgresql+psycopg2://clusterlab@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            out = run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
            pid_file = data / "postmaster.pid"
            if out.returncode != 0 and pid_file.exists():  # pg_ctl could not stop it: kill its postmaster
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow tracking server


class MlflowServer:
    """`mlflow server --backend-store-uri BACKEND` on 127.0.0.1:``port`` (a free one by default),
    artifacts proxied to ``work``/mlflow-artifacts, output appended to ``work``/mlflow-server.log
    (one log across restarts). :meth:`start` returns at once; :meth:`wait_healthy` waits for
    ``/health``. :meth:`kill` and :meth:`start` again make an outage on the same port and store."""

    def __init__(self, backend: str, work: Path, port: int | None = None, workers: int = 1) -> None:
        self.backend, self.work, self.port, self.workers = backend, Path(work), port or free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.work / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "mlflow server already running"
        exe = [str(BIN / "mlflow")] if (BIN / "mlflow").exists() else [sys.executable, "-m", "mlflow"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.work.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as out:
            out.write(f"==== [servers] mlflow server starting at {time.time():.3f} ====\n")
            out.flush()
            self.proc = subprocess.Popen(
                [*exe, "server", "--backend-store-uri", self.backend, "--artifacts-destination",
                 str(self.work / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", str(self.workers)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/health", timeout=5).close()
            return True
        except OSError:
            return False

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        assert self.proc is not None, "mlflow server not started"
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            assert self.proc.poll() is None, f"mlflow server exited {self.proc.returncode}:\n{tail(self.log)}"
            assert time.monotonic() < deadline, f"mlflow server not healthy after {timeout_s:.0f} s:\n{tail(self.log)}"
            time.sleep(0.25)

    def kill(self) -> None:
        """Crash it: SIGKILL its process group (requests in flight are cut off)."""
        if self.proc is not None:
            kill_group(self.proc)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is not None:
            stop_groups([self.proc], grace_s)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def mlflow_server(backend: str, work: Path, port: int | None = None) -> Iterator[MlflowServer]:
    """A started :class:`MlflowServer` (call ``wait_healthy()`` before use), stopped at the end."""
    server = MlflowServer(backend, work, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
