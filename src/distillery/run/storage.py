"""Where a run lives: a folder (local, or shared by every node), or an object-store URI.

    storage_path: /shared/runs        every process reads and writes the run's files in place
    storage_path: s3://bucket/runs    (or gs://) every process works on local copies

For a run at a URI each node keeps copies under its cache folder (`DISTILLERY_CACHE`,
default ~/.cache/distillery): the driver mirrors the whole run and uploads what each stage
produced, files first and the manifest last, so the manifest at the URI never names a file
that is not there; Ray Train workers and Serve replicas `fetch` only the files they read,
each checked against the sha256 the run's manifest recorded; the training shards are
streamed from the URI instead (`read_verified`: in memory, checked, no copy on disk). Ray
Train's checkpoints and Ray Data's writes go to the URI directly through pyarrow's
filesystems, which take their credentials and endpoint from the usual environment (AWS_*,
GOOGLE_APPLICATION_CREDENTIALS; STORAGE_EMULATOR_HOST for a GCS emulator).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distillery.config.location import SCHEMES, check_location, is_uri  # noqa: F401 (storage.is_uri, ...)
from distillery.core.errors import UserError
from distillery.core.files import atomic_path, sha256_file

_BLOCK = 1 << 20


def join(location: str | Path, *parts: str) -> str:
    """`location`/`parts`; a URI keeps its query (e.g. ?endpoint_override=...) at the end."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, _, query = str(location).partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + (f"?{query}" if query else "")


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) of a folder or URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        if urlsplit(str(location)).scheme == "gs" and os.environ.get("STORAGE_EMULATOR_HOST"):
            return _gcs_emulator(str(location), os.environ["STORAGE_EMULATOR_HOST"])
        return pafs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as e:
        raise UserError(f"{location}: cannot open ({e})") from None


def _gcs_emulator(location: str, host: str) -> tuple[pafs.FileSystem, str]:
    """gs:// on a GCS emulator, named the way Google's own clients read it
    (STORAGE_EMULATOR_HOST=http://host:port). pyarrow's gs:// URIs cannot say "no
    credentials", and an emulator has none to check."""
    endpoint, parts = urlsplit(host if "://" in host else f"http://{host}"), urlsplit(location)
    # A short retry limit: what an emulator refuses, it refuses every time (with pyarrow's
    # default, one unimplemented request was retried for over 5 minutes).
    fs = pafs.GcsFileSystem(anonymous=True, scheme=endpoint.scheme, endpoint_override=endpoint.netloc,
                            retry_time_limit=timedelta(seconds=20))
    return fs, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


def cache_dir(location: str) -> Path:
    """This node's folder for copies of files under the URI `location`."""
    parts = urlsplit(location)
    base = Path(os.environ.get("DISTILLERY_CACHE") or Path.home() / ".cache" / "distillery")
    # The query (an endpoint, a region) names a different store: keep it apart.
    tag = f"-{hashlib.sha256(parts.query.encode()).hexdigest()[:8]}" if parts.query else ""
    return base / parts.scheme / (parts.netloc + tag) / parts.path.strip("/")


def fetch(location: str | Path, files: Mapping[str, str], *, missing_ok: bool = False) -> Path:
    """A local folder holding `files` (path under `location` -> sha256): `location` itself
    when it is a folder, else this node's copy, downloading what is missing or differs.
    A file that does not arrive intact is refused, naming it (or skipped if `missing_ok`)."""
    if not is_uri(location):
        return Path(location)
    root, (fs, base) = cache_dir(str(location)), filesystem(location)
    for rel, sha in files.items():
        dest = root / rel
        if dest.is_file() and sha256_file(dest) == sha:
            continue
        try:
            _download(fs, f"{base}/{rel}", dest, sha)
        except (UserError, OSError) as e:
            if not missing_ok:
                raise UserError(f"{join(location, rel)}: {e}") from None
    return root


def _download(fs: pafs.FileSystem, path: str, dest: Path, sha: str | None) -> None:
    """Copy one object to `dest` atomically, checking its sha256 before it gets the name."""
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            while block := src.read(_BLOCK):
                digest.update(block)
                out.write(block)
        if sha is not None:
            _check_sha(digest.hexdigest(), sha)


def _check_sha(got: str, sha: str) -> None:
    if got != sha:
        raise UserError(f"sha256 mismatch (expected {sha[:12]}…, got {got[:12]}…); "
                        "the object is corrupt or was changed after it was written")


def read_verified(location: str, rel: str, sha: str) -> bytes:
    """The object `location`/`rel` in memory, refused (naming it) unless its sha256 is `sha`:
    for readers that stream a file once and keep no copy on the node's disk."""
    fs, base = filesystem(location)
    try:
        with fs.open_input_stream(f"{base}/{rel}") as src:
            blob = src.read()
        _check_sha(hashlib.sha256(blob).hexdigest(), sha)
    except (UserError, OSError) as e:
        raise UserError(f"{join(location, rel)}: {e}") from None  # named as `fetch` names it
    return blob


def read_verified_tables(batch: pa.Table, location: str) -> pa.Table:
    """The Parquet files named in `batch` (columns rel, sha256), each read with `read_verified`:
    a Ray Data read task (`training.on_ray.read_shards`). Here rather than beside its caller:
    every worker process Ray starts for the task imports the task's module (the raylet started
    several during one epoch on the rig), and `training.on_ray` takes 2.5 s to import (torch,
    Ray Train), this module 0.3 s."""
    return pa.concat_tables([pq.read_table(pa.BufferReader(read_verified(location, rel, sha)))
                             for rel, sha in zip(batch["rel"].to_pylist(), batch["sha256"].to_pylist())])


def download(location: str, rel: str, dest: Path) -> bool:
    """Copy the object `location`/`rel` to `dest` (no check: the run's manifest, its root of
    trust); False when there is no such object."""
    fs, base = filesystem(location)
    if fs.get_file_info(f"{base}/{rel}").type != pafs.FileType.File:
        return False
    _download(fs, f"{base}/{rel}", dest, None)
    return True


def upload(root: Path, rels: Iterable[str], location: str) -> None:
    """Copy `root`/rel to `location`/rel for each rel. An object appears only once it is
    complete (S3 and GCS publish an upload when it is closed)."""
    fs, base = filesystem(location)
    for rel in rels:
        with open(root / rel, "rb") as src, fs.open_output_stream(f"{base}/{rel}") as out:
            while block := src.read(_BLOCK):
                out.write(block)


def list_files(location: str | Path) -> dict[str, int]:
    """{path relative to it: size in bytes} of every file under a folder or URI."""
    fs, base = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def delete(location: str | Path) -> None:
    """Remove a folder (or every object under a URI prefix); nothing if it is not there."""
    fs, base = filesystem(location)
    if is_uri(location):  # objects, and no folder: a prefix is gone with its last object
        fs.delete_dir_contents(base, missing_dir_ok=True)
    elif Path(base).exists():
        fs.delete_dir(base)
