"""cluster.yaml passes the checks `ray up` runs before it contacts a node, and installs
stickyray from the copy it sends (stickyray is not on PyPI)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # raises on a config `ray up` would refuse
    return dict(config)


def test_cluster_yaml_installs_stickyray_from_the_files_it_copies() -> None:
    config = _config()
    mounts: dict[str, str] = config.get("file_mounts", {})
    # `ray up` runs from the repository root: local paths are relative to it.
    for local in mounts.values():
        assert (ROOT / local).exists(), f"file_mounts names {local}, which is not in the repo"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert installs, "no setup command installs stickyray"
    for command in installs:
        found = re.search(r"cd (\S+) && \S+ install '\.\[offline\]'", command)
        assert found, f"does not install from the copied checkout: {command}"
        copied = {remote.removeprefix(f"{found.group(1)}/") for remote in mounts}
        # Everything setuptools builds the package from is copied there.
        assert {"pyproject.toml", "README.md"} | packages <= copied
