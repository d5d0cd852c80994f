"""The supported-version check run on ``import peft_mose``, and the environment record written into artefacts.

The supported ranges live once, in ``pyproject.toml``; they are read back here from the installed distribution's
metadata, so the check cannot drift from what pip enforces. Why each bound: ``docs/versions.md``.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

DISTRIBUTION = "peft-mose"
# The libraries whose private internals the package touches: outside the declared range they fail deep inside a
# hook, so the import fails first with a message that says why.
CHECKED = ("peft", "transformers")
# Reported by environment(), by distribution name; None where not installed.
REPORTED = ("torch", "transformers", "peft", "accelerate", "deepspeed")


def _installed(name: str) -> str | None:
    """The installed version of distribution ``name``, None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_version() -> str:
    """``peft_mose.__version__``: the installed distribution's version (defined once, in ``pyproject.toml``), or
    ``"0+unknown"`` when the package is imported from a checkout without being installed."""
    return _installed(DISTRIBUTION) or "0+unknown"


def supported_ranges() -> dict[str, Requirement]:
    """The requirements of :data:`CHECKED` as the installed ``peft-mose`` declares them (base dependencies, not
    extras); empty when the package is not installed, as there is nothing declared to check against."""
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for line in declared:
        requirement = Requirement(line)
        if requirement.name in CHECKED and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
            ranges[requirement.name] = requirement
    return ranges


def check_supported_versions() -> None:
    """Raise ImportError naming the package, its installed version and the supported range when peft or
    transformers is installed outside the range ``pyproject.toml`` declares."""
    for name, requirement in supported_ranges().items():
        installed = _installed(name)
        if installed is not None and not requirement.specifier.contains(installed, prereleases=True):
            raise ImportError(
                f"peft_mose {package_version()} supports {name}{requirement.specifier}, but {name} {installed} is "
                f"installed: install a supported release (pip install '{requirement}'); see docs/versions.md."
            )


def _git(*args: str) -> str | None:
    """Output of ``git args`` run in the package's directory; None without git or outside a checkout."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout the package is imported from; ``(None, None)`` when it is not imported
    from one (an installed copy, even inside some other repository's ignored folder, is not tracked there)."""
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return commit, None if status is None else bool(status)


def environment() -> dict[str, str | bool | None]:
    """The versions a result was produced with, for the artefacts (``run_config.json``, ``scores.json``): peft_mose,
    python and the libraries of :data:`REPORTED` (None where absent), and the git commit of the checkout with
    whether its tree had uncommitted changes (both None outside a git checkout)."""
    commit, dirty = _git_state()
    return {
        "peft_mose": _installed(DISTRIBUTION),
        "python": platform.python_version(),
        **{name: _installed(name) for name in REPORTED},
        "git_commit": commit,
        "git_dirty": dirty,
    }
