"""The embedded Postgres finds the ``useradd`` pgserver needs, even on a minimal ``PATH``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
