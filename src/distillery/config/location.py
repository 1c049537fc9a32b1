"""Where a run may live: a folder (local, or shared by every node), or an s3:// or gs:// URI.

Checked when the config loads (`storage_path`), before anything is written; `run.storage`
does the reading and writing.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

SCHEMES = ("s3", "gs")


def is_uri(location: str | Path) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(location)))


def check_location(location: str) -> str:
    """A folder path, or an s3:// / gs:// URI with a bucket; anything else is refused."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{parts.scheme}:// is not supported; give a folder (local or shared by every node) "
                         f"or a URI starting with {' or '.join(s + '://' for s in SCHEMES)}")
    if not parts.netloc:
        raise ValueError(f"{location!r} names no bucket")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        # cache folders mirror it
        raise ValueError(f"{location!r}: '.' and '..' are not allowed in a URI's path")
    return location
