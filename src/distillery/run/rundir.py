"""The run directory and its manifest: what ran, with what, producing which files.

    runs/<name>/manifest.json   config, versions, git sha, hardware, per-stage status,
                                sha256 of every file a stage produced
    runs/<name>/config.yaml     the resolved config

A stage is done when the manifest says so, its fingerprint (a hash of the config it read
and of the stages it read from) is unchanged, and every file it produced still verifies.
So re-running a finished run is a no-op, a changed config redoes only what it touches, and
a run killed mid-stage redoes that stage alone.

A run at an object-store URI (`storage_path: s3://...`) is worked on in this node's copy
(`storage.cache_dir`): opening it downloads the manifest and the files it records, and every
manifest write uploads the files that changed, then the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from distillery.config import PipelineConfig, save_resolved
from distillery.core.errors import UserError
from distillery.core.files import atomic_write_json, read_json, sha256_file, verify_sha256
from distillery.run import storage

_PACKAGES = ("distillery", "torch", "ray", "pyarrow", "torchao", "safetensors", "scikit-learn", "numpy")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunDir:
    """One run's folder. Only the driver process writes the manifest."""

    def __init__(self, root: str | Path, location: str | None = None):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.location = location or str(self.root.resolve())  # where other processes find the run
        self.remote = storage.is_uri(self.location)
        self._uploaded: dict[str, str] = {}  # what the URI holds: path -> sha256

    @classmethod
    def at(cls, cfg: PipelineConfig) -> RunDir:
        """The run `cfg` names, without touching it."""
        location = storage.join(cfg.storage_path, cfg.name)
        return cls(storage.cache_dir(location), location) if storage.is_uri(location) else cls(location)

    @classmethod
    def open(cls, cfg: PipelineConfig) -> RunDir:
        run = cls.at(cfg)
        run.root.mkdir(parents=True, exist_ok=True)
        if run.remote:
            run.refresh()
        before = run.manifest() if run.manifest_path.exists() else None
        manifest = {**(before or _new_manifest(cfg)), "config": cfg.to_dict(), "git_sha": _git_sha(),
                    "versions": _versions(), "hardware": _hardware()}
        if manifest != before:  # re-running a finished run on the same machine writes nothing
            save_resolved(cfg, run.root / "config.yaml")
            run._write(manifest, also=["config.yaml"])
        return run

    def location_of(self, rel: str) -> str:
        """Where another process (a Ray Train worker, a replica) finds `rel` of this run."""
        return storage.join(self.location, rel)

    def share(self, rels: list[str]) -> dict[str, str]:
        """{rel: sha256} of these files of the run, uploaded first if the URI lacks them, so
        a worker on any node can `storage.fetch` them."""
        shas = {rel: sha256_file(self.root / rel) for rel in rels}
        if self.remote:
            self._upload([rel for rel, sha in shas.items() if self._uploaded.get(rel) != sha], shas)
        return shas

    @property
    def address(self) -> str:
        """How a command names the run: its URI, or its folder as configured."""
        return self.location if self.remote else str(self.root)

    def describe(self) -> str:
        return f"{self.location} (this node's copy: {self.root})" if self.remote else str(self.root.resolve())

    def manifest(self) -> dict[str, Any]:
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict) or manifest.get("format") != 1:
            raise UserError(f"{self.manifest_path}: not a distillery run manifest")
        return manifest

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(name, {})

    def is_done(self, name: str, fp: str) -> bool:
        """True when `name` finished with this fingerprint and all its files verify."""
        manifest = self.manifest()
        record = manifest["stages"].get(name, {})
        if record.get("status") != "done" or record.get("fingerprint") != fp:
            return False
        try:
            for rel in record.get("files", []):
                verify_sha256(self.root / rel, manifest["files"][rel])
        except (UserError, KeyError):
            return False
        return True

    def start(self, name: str, fp: str, fresh: bool = False) -> int:
        """Mark `name` running; return its attempt number. A stage that crashed or failed with
        the same fingerprint keeps its attempt (so Ray Train resumes its checkpoints); a
        finished or changed one starts a new attempt from scratch."""
        prev = self.stage(name)
        resume = not fresh and prev.get("fingerprint") == fp and prev.get("status") in ("running", "failed")
        attempt = prev.get("attempt", 0) + (0 if resume else 1)
        self._update_stage(name, {"status": "running", "fingerprint": fp, "attempt": attempt,
                                  "started_at": _now()})
        return attempt

    def fail(self, name: str, error: str) -> None:
        self._update_stage(name, {"status": "failed", "error": error, "finished_at": _now()})

    def finish(self, name: str, fp: str, files: list[Path], metrics: dict[str, Any]) -> None:
        """Record the stage's files with their sha256 and mark it done (one atomic write)."""
        manifest = self.manifest()
        rels = [str(Path(f).resolve().relative_to(self.root.resolve())) for f in files]
        for rel in rels:
            manifest["files"][rel] = sha256_file(self.root / rel)
        record = manifest["stages"].get(name, {})
        record.update(status="done", fingerprint=fp, files=rels, metrics=metrics, finished_at=_now())
        record.pop("error", None)
        manifest["stages"][name] = record
        self._write(manifest)

    def mark_stale(self, names: list[str]) -> None:
        """Force `names` to run again (their inputs changed), keeping their records."""
        manifest = self.manifest()
        for name in names:
            if manifest["stages"].get(name, {}).get("status") == "done":
                manifest["stages"][name]["status"] = "stale"
        self._write(manifest)

    def verify_file(self, rel: str | Path) -> Path:
        """The absolute path of a recorded file, after checking its sha256."""
        rel = str(rel)
        expected = self.manifest()["files"].get(rel)
        if expected is None:
            raise UserError(f"{self.root / rel}: not recorded in {self.manifest_path}")
        verify_sha256(self.root / rel, expected)
        return self.root / rel

    def _update_stage(self, name: str, fields: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["stages"].setdefault(name, {}).update(fields)
        self._write(manifest)

    def _write(self, manifest: dict[str, Any], also: Sequence[str] = ()) -> None:
        atomic_write_json(self.manifest_path, manifest)
        if self.remote:  # the files first: the manifest at the URI never names a missing file
            # Only files as recorded: one missing here (its stage will run again) or being
            # rewritten by a running stage waits for that stage's `finish`.
            files = manifest["files"]
            self._upload([rel for rel, sha in files.items() if self._uploaded.get(rel) != sha
                          and (self.root / rel).is_file() and sha256_file(self.root / rel) == sha], files)
            storage.upload(self.root, [*also, "manifest.json"], self.location)

    def _upload(self, rels: list[str], shas: dict[str, str]) -> None:
        storage.upload(self.root, rels, self.location)
        self._uploaded.update({rel: shas[rel] for rel in rels})

    def refresh(self) -> None:
        """Make this node's copy match the URI: its manifest, config and recorded files. A
        recorded file that is missing or damaged there is left out, so its stage runs again."""
        if not storage.download(self.location, "manifest.json", self.manifest_path):
            self.manifest_path.unlink(missing_ok=True)  # the URI is the truth: a new run
            return
        storage.download(self.location, "config.yaml", self.root / "config.yaml")
        files = self.manifest()["files"]
        storage.fetch(self.location, files, missing_ok=True)
        sizes = storage.list_files(self.location)
        self._uploaded = {rel: sha for rel, sha in files.items() if sizes.get(rel) is not None
                          and _matches(self.root / rel, sha, sizes[rel])}


def _matches(path: Path, sha: str, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha


def local_view(location: str, wanted: Callable[[str], bool]) -> tuple[Path, dict[str, str]]:
    """(a local folder with the run's files, the sha256 the manifest records per file): a
    run's folder itself ({} for the shas: read in place), or for a run at a URI this node's
    copy of its manifest and of the recorded files `wanted` selects, each verified."""
    if not storage.is_uri(location):
        return Path(location), {}
    root = storage.cache_dir(location)
    if not storage.download(location, "manifest.json", root / "manifest.json"):
        raise UserError(f"{location}: no manifest.json there; not a distillery run")
    files = RunDir(root, location).manifest()["files"]
    storage.fetch(location, {rel: sha for rel, sha in files.items() if wanted(rel)})
    return root, files


def _new_manifest(cfg: PipelineConfig) -> dict[str, Any]:
    return {"format": 1, "run": cfg.name, "created_at": _now(), "stages": {}, "files": {}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _hardware() -> dict[str, Any]:
    import torch  # torch only for the machine facts: the run folder itself needs none

    info: dict[str, Any] = {
        "machine": platform.machine(), "system": platform.system(), "processor": _cpu_model(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
