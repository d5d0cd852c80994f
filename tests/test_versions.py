"""peft_mose/_versions.py: the import-time check of the peft and transformers ranges, and environment()."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import peft_mose
from peft_mose import _versions

ROOT = Path(__file__).resolve().parents[1]


def _fake_versions(monkeypatch: pytest.MonkeyPatch, **versions: str) -> None:
    """Make ``metadata.version`` report ``versions`` (by distribution name) and the real ones otherwise."""
    real = metadata.version
    monkeypatch.setattr(_versions.metadata, "version", lambda name: versions.get(name) or real(name))


def test_ranges_are_the_ones_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = _versions.supported_ranges()
    assert sorted(ranges) == ["peft", "transformers"]
    # The installed metadata is pyproject's, not a stale copy (reinstall after editing pyproject.toml).
    assert {str(r) for r in ranges.values()} <= {str(Requirement(line)) for line in declared}


def test_installed_versions_pass():
    _versions.check_supported_versions()
    assert peft_mose.__version__ == metadata.version("peft-mose")


@pytest.mark.parametrize(
    ("name", "version"),
    [("transformers", "5.3.0"), ("transformers", "6.0.0"), ("transformers", "6.0.0.dev0"), ("peft", "0.22.0")],
)
def test_out_of_range_version_raises_naming_package_version_and_range(monkeypatch, name, version):
    _fake_versions(monkeypatch, **{name: version})
    specifier = _versions.supported_ranges()[name].specifier
    with pytest.raises(ImportError) as error:
        _versions.check_supported_versions()
    message = str(error.value)
    assert f"supports {name}{specifier}, but {name} {version} is installed" in message
    assert "docs/versions.md" in message


def test_prereleases_inside_the_range_pass(monkeypatch):
    _fake_versions(monkeypatch, transformers="5.30.0.dev0", peft="0.21.3rc1")
    _versions.check_supported_versions()


def test_the_import_fails_first_with_the_message(tmp_path):
    # A fresh interpreter where transformers reports 5.3.0: `import peft_mose` stops before PEFT is imported.
    code = """
import importlib.metadata as m, sys
real = m.version
m.version = lambda name: "5.3.0" if name == "transformers" else real(name)
try:
    import peft_mose
except ImportError as error:
    print(error, "peft" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "but transformers 5.3.0 is installed" in done.stdout and done.stdout.strip().endswith("False")


def test_uninstalled_checkout_has_an_unknown_version_and_no_ranges(monkeypatch):
    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_versions.metadata, "version", missing)
    monkeypatch.setattr(_versions.metadata, "requires", missing)
    assert _versions.package_version() == "0+unknown" and _versions.supported_ranges() == {}
    _versions.check_supported_versions()
    assert _versions.environment()["deepspeed"] is None


def test_environment_records_versions_and_the_checkout():
    env = _versions.environment()
    assert list(env) == ["peft_mose", "python", "torch", "transformers", "peft", "accelerate", "deepspeed",
                         "git_commit", "git_dirty"]  # fmt: skip
    assert env["torch"] == torch.__version__ and env["peft_mose"] == peft_mose.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI and development); an unpacked sdist has no commit to record
        assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)
    else:
        assert env["git_commit"] is None and env["git_dirty"] is None


def test_environment_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(_versions.subprocess, "run", no_git)
    env = _versions.environment()
    assert (env["git_commit"], env["git_dirty"]) == (None, None) and env["torch"] == torch.__version__
