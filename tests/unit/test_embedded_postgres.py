"""The embedded Postgres: ``useradd`` found on a minimal ``PATH``, holders that died forgotten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from memory import embedded_postgres


@pytest.fixture
def fresh_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root on a machine where pgserver has not yet made its system user."""
    monkeypatch.setattr(embedded_postgres.os, "geteuid", lambda: 0)

    def no_such_user(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(embedded_postgres.pwd, "getpwnam", no_such_user)


def test_a_minimal_path_gains_the_directory_of_useradd(
    fresh_root: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "useradd").write_text("#!/bin/sh\n")
    (sbin / "useradd").chmod(0o755)
    monkeypatch.setattr(embedded_postgres, "_SYSTEM_DIRS", (str(tmp_path / "none"), str(sbin)))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    embedded_postgres.ensure_useradd_on_path()

    assert os.environ["PATH"].split(os.pathsep) == [str(tmp_path / "bin"), str(sbin)]
    assert shutil.which("useradd") == str(sbin / "useradd")


def test_no_useradd_anywhere_is_a_clear_error(
    fresh_root: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_postgres, "_SYSTEM_DIRS", (str(tmp_path),))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    with pytest.raises(RuntimeError, match="DATABASE_URL"):
        embedded_postgres.ensure_useradd_on_path()


def test_an_existing_system_user_needs_no_useradd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_postgres.os, "geteuid", lambda: 0)
    monkeypatch.setattr(embedded_postgres.pwd, "getpwnam", lambda name: object())
    monkeypatch.setattr(embedded_postgres, "_SYSTEM_DIRS", (str(tmp_path),))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    embedded_postgres.ensure_useradd_on_path()  # no error: nothing to create

    assert os.environ["PATH"] == str(tmp_path / "bin")


_HOLDER = """
import sys
from pathlib import Path
from memory.embedded_postgres import EmbeddedPostgres

EmbeddedPostgres(Path(sys.argv[1])).start()
print("started", flush=True)
sys.stdin.read()  # holds its handle until killed
"""


def test_a_killed_holder_does_not_keep_the_server_running(tmp_path: Path) -> None:
    """pgserver stops the server when its last holder lets go; a SIGKILLed one never does."""
    data = tmp_path / "pg"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"started\n"
    finally:
        holder.kill()
        holder.wait()
    postgres = embedded_postgres.EmbeddedPostgres(data)
    postgres.start()
    server = postgres._server.get_postmaster_info().process
    try:
        postgres.stop()
        assert not _running(server), "the dead holder's handle kept the server up"
    finally:
        if _running(server):
            server.kill()


def _running(process: psutil.Process) -> bool:
    # A stopped server whose parent died is a zombie until something reaps it.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_LOCKER = """
from pgserver.postgres_server import PostgresServer
with PostgresServer._lock:
    print("locked", flush=True)
    input()
"""


def test_dead_handles_are_forgotten_under_pgservers_lock(tmp_path: Path) -> None:
    """A process starting the same server at that moment writes the file under that lock."""
    data = tmp_path / "pg"
    data.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handles = data / ".handle_pids.json"
    handles.write_text(json.dumps([dead.pid, os.getpid()]))
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
        forget = threading.Thread(
            target=embedded_postgres.EmbeddedPostgres(data)._forget_dead_handles
        )
        forget.start()
        forget.join(timeout=1.0)
        assert forget.is_alive(), "the file was rewritten while pgserver held its lock"
        assert json.loads(handles.read_text()) == [dead.pid, os.getpid()]
        locker.communicate(b"\n", timeout=30)
        forget.join(timeout=30)
        assert not forget.is_alive()
    finally:
        locker.kill()
    assert json.loads(handles.read_text()) == [os.getpid()]


def test_a_path_too_long_for_the_socket_is_refused(tmp_path: Path) -> None:
    """pgserver would put the socket in a world-writable /tmp directory, open to every user."""
    data = tmp_path / ("d" * (110 - len(str(tmp_path)))) / "pg"
    with pytest.raises(ValueError, match="too long for the Postgres socket.*STICKYRAY_DATA_DIR"):
        embedded_postgres.EmbeddedPostgres(data).start()
    assert not data.parent.exists(), "nothing was created"


def test_a_second_start_in_one_process_counts_as_a_holder_again(tmp_path: Path) -> None:
    """pgserver hands back its cached server object, which does not count this process."""
    data = tmp_path / "pg"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    postgres = embedded_postgres.EmbeddedPostgres(data)
    server = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"started\n"
        postgres.start()
        server = postgres._server.get_postmaster_info().process
        postgres.stop()  # the holder keeps it running
        postgres.start()
        handles = json.loads((data / ".handle_pids.json").read_text())
        assert sorted(handles) == sorted([holder.pid, os.getpid()])
    finally:
        postgres.stop()
        holder.kill()
        holder.wait()
        if server is not None and _running(server):
            server.kill()


def test_a_postmaster_pid_naming_another_process_is_left_behind(tmp_path: Path) -> None:
    """After an unclean stop (power loss, a killed container) postmaster.pid stays, and its
    pid may since belong to another process: that one is neither taken for the server nor
    signalled."""
    data = tmp_path / "pg"
    postgres = embedded_postgres.EmbeddedPostgres(data)
    postgres.start()
    pidfile = (data / "postmaster.pid").read_text()
    postgres.stop()
    assert not (data / "postmaster.pid").exists()
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        (data / "postmaster.pid").write_text(
            pidfile.replace(pidfile.split()[0], str(bystander.pid), 1)
        )
        postgres = embedded_postgres.EmbeddedPostgres(data)
        postgres.start()
        try:
            server = postgres._server.get_postmaster_info().process
            assert server.pid != bystander.pid and "postgres" in server.name()
        finally:
            postgres.stop()
        assert bystander.poll() is None, "the other process was signalled"
    finally:
        bystander.kill()
        bystander.wait()
