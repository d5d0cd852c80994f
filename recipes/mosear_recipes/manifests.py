"""File manifests: the files a folder's results depend on, each with its size and SHA-256, written atomically once
the files are final and compared before anything of the folder is loaded. A checkpoint's ``manifest.json`` lists every
file in it (written by :mod:`.integrity`); a finished run's ``model_manifest.json`` lists the files its trained model is
rebuilt from, so that a run folder holding parts of two runs is refused. Imports nothing of training."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from peft.utils import SAFETENSORS_WEIGHTS_NAME

from .run_config import ADAPTER_DIR, PROJECTORS_FILE, REFERENCE_FILE, RUN_CONFIG
from .textfiles import load_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_MANIFEST = "model_manifest.json"
MANIFEST_FORMAT = 1
# The trained weights in a run or a checkpoint (projectors: merr_finetune.py's only). adapter_config.json is not among them: its fields that change results
# are recorded in the adapter's weights file (peft_mose.checksum), and the others (inference_mode ...) may be edited.
WEIGHT_FILES = (f"{ADAPTER_DIR}/{SAFETENSORS_WEIGHTS_NAME}", PROJECTORS_FILE)
# A finished run's model: its weights, the run configuration they were trained under (base model, features) and the
# outputs they gave on a fixed batch.
MODEL_FILES = (*WEIGHT_FILES, RUN_CONFIG, REFERENCE_FILE)
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(directory: Path) -> dict[str, Path]:
    """``{relative path: path}`` of every file in ``directory`` but its manifests (and a manifest being written)."""
    files = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    return {name: path for name, path in files.items() if not name.startswith((MANIFEST, MODEL_MANIFEST))}


def write_manifest(directory: Path, step: int, names: Iterable[str] | None = None, name: str = MANIFEST) -> Path:
    """Write ``directory/name`` listing ``names`` (default: every file of the folder) with their size and SHA-256,
    after flushing each to disk; written to a temporary name and renamed, so that a manifest is complete or absent."""
    files = folder_files(directory) if names is None else {n: directory / n for n in names}
    entries = {}
    for relative, path in sorted(files.items()):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())  # the data the manifest vouches for is on disk before the manifest is
        entries[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = directory / name
    partial = directory / f"{name}.tmp"
    with partial.open("w", encoding="utf-8") as handle:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "files": entries}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, manifest)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself
    finally:
        os.close(descriptor)
    return manifest


def read_listed(manifest: Path) -> dict[str, dict]:
    """The ``files`` entry of a manifest; a ``ValueError`` naming the file when it cannot be read."""
    try:
        listed = load_json(manifest)["files"]
        if not isinstance(listed, dict):
            raise TypeError(f"'files' is a {type(listed).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest} is unreadable ({err})") from err
    return listed


def changed_files(directory: Path, listed: dict[str, dict], names: Iterable[str]) -> list[str]:
    """What differs between the files ``names`` of ``directory`` and their ``listed`` manifest entries: missing,
    unlisted, or another size or SHA-256."""
    problems = []
    for name in sorted(names):
        path = directory / name
        if name not in listed:
            problems.append(f"{path} is not in the manifest")
        elif not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != listed[name]["size"]:
            problems.append(f"{path} changed: {path.stat().st_size} bytes, {listed[name]['size']} when written")
        elif file_sha256(path) != listed[name]["sha256"]:
            problems.append(f"{path} changed: its SHA-256 differs from the one written")
    return problems


def weights_problems(directory: Path) -> list[str] | None:
    """What differs in the trained model of ``directory`` from what its run wrote: a checkpoint's weight files against
    its ``manifest.json``, a finished run's model files against its ``model_manifest.json``. ``None`` when the folder
    has neither manifest (a run that ended before writing it, or one written before manifests existed)."""
    if (directory / MODEL_MANIFEST).is_file():
        listed = read_listed(directory / MODEL_MANIFEST)
        return changed_files(directory, listed, listed)
    if (directory / MANIFEST).is_file():
        listed = read_listed(directory / MANIFEST)
        return changed_files(directory, listed, [n for n in WEIGHT_FILES if n in listed or (directory / n).exists()])
    return None


def check_weights(directory: Path) -> None:
    """Refuse a run folder or checkpoint whose model files are not the ones its run wrote (:func:`weights_problems`:
    parts of two runs, a file replaced or damaged); warn when it has no manifest to check them against."""
    problems = weights_problems(directory)
    if problems:
        raise ValueError(
            f"{directory} does not hold the model its run wrote, nothing of it was loaded: {'; '.join(problems)}. "
            "Its files come from different runs, or were changed or damaged after the run saved them."
        )
    if problems is None:
        logger.warning("%s has no %s or %s: its files cannot be checked against what its run wrote (a run that "
                       "stopped before finishing, or one saved before manifests existed).", directory, MODEL_MANIFEST,
                       MANIFEST)  # fmt: skip
