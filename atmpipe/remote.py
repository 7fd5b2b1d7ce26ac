"""Where a store lives: a local directory, or any fsspec URL (s3://, gs://, az://, memory://, file://).

Arrays and group metadata go through Zarr's own store layer: `zarr.open_group` takes the URL and builds
a FsspecStore. The few things Zarr has no API for (does a store exist, delete it, its size, the small
commit markers of a multi-process harvest) go through the same fsspec filesystem here.

Credentials come from each filesystem's standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_PROFILE for S3; GOOGLE_APPLICATION_CREDENTIALS for GCS; ...): atmpipe never reads,
prints or stores them, and names a store by its URL only.

Commits stay atomic without a rename: an object store replaces an object whole on PUT, so a reader sees
the old zarr.json or the new one, never a mix; locally, small files are written to a temp name and renamed.

Failures on the way (timeouts, 500s, 503 SlowDown, dropped connections, a body cut short) are retried a
bounded number of times by the filesystem library itself, configured through fsspec's own configuration
(`S3_RETRIES`); what still fails after that is named in one line by `fault`, and a re-run resumes.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from atmpipe.errors import UserError

Location = Path | str  # a local directory, or the URL of a remote one


# s3:// defaults, set through fsspec's configuration so that a user's own (the FSSPEC_S3 variable, an fsspec
# config file) wins key by key: botocore retries 5xx answers, throttling (SlowDown), timeouts and dropped
# connections up to `max_attempts` times with exponential backoff, and s3fs retries a body cut short, and a
# SlowDown, with its own bounded default (S3FileSystem.retries, 5). An outage ends the run, not hangs it.
S3_RETRIES = {
    "config_kwargs": {
        "retries": {"max_attempts": 5, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 60,
    },
}


class StoreFault(UserError):
    """An object store that still failed after the retries (the stage adds how to resume)."""


def configure_retries() -> None:
    """Fill in `S3_RETRIES` where the user's fsspec configuration says nothing."""
    from fsspec.config import conf  # optional: only for URLs

    s3 = conf.setdefault("s3", {})
    # (a copy: botocore rewrites the retries dict it is given)
    s3["config_kwargs"] = {**copy.deepcopy(S3_RETRIES["config_kwargs"]), **s3.get("config_kwargs", {})}


def fault(e: BaseException) -> str | None:
    """An object-store failure, named in one line (the service's error code and message, or the network
    error); None when `e` is no such failure."""
    if isinstance(e, UserError):  # already said in atmpipe's words
        return None
    for err in (e, e.__cause__, None if e.__suppress_context__ else e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code, message = response["Error"].get("Code"), response["Error"].get("Message", "")
            named = (
                f"HTTP {status}" if str(code) == str(status) else f"{code} (HTTP {status})"
            )  # a HEAD: no body
            return f"{named}: {message}".rstrip(": ")
    libraries = {c.__module__.split(".")[0] for c in type(e).__mro__}
    if libraries & {"botocore", "aiobotocore", "aiohttp", "urllib3", "fsspec", "s3fs"}:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
    return None


def location(path: str | Path) -> Location:
    """A local Path, or the URL itself for a remote store (file:// URLs become local paths)."""
    if isinstance(path, Path):
        return path
    text = str(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text:
        _check_protocol(text)
        configure_retries()
        return text.rstrip("/")
    return Path(text)


def _check_protocol(url: str) -> None:
    """An unknown scheme, or one whose fsspec package is missing, is the user's to fix: say how."""
    from fsspec import get_filesystem_class  # optional: only for URLs

    scheme = url.split("://", 1)[0]
    try:
        get_filesystem_class(scheme)
    except ImportError as e:
        raise UserError(
            f"{scheme}:// stores need a package that is not installed ({e}); install it and rerun"
        ) from None
    except ValueError:
        raise UserError(
            f"unknown storage scheme {scheme}:// in {url}; use a local path or an fsspec URL"
        ) from None


def is_remote(loc: Location) -> bool:
    return isinstance(loc, str)


def _fs(url: str):
    """(filesystem, path inside it); listings are re-read, since other processes write the same store."""
    from fsspec.core import url_to_fs  # optional: only for URLs

    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


def exists(loc: Location) -> bool:
    if not is_remote(loc):
        return loc.exists()
    fs, path = _fs(loc)
    return _found(loc, lambda: fs.info(path))


def has_file(loc: Location, key: str) -> bool:
    if not is_remote(loc):
        return (loc / key).is_file()
    fs, path = _fs(loc)
    return _found(loc, lambda: fs.info(f"{path}/{key}")["type"] == "file")


def _found(loc: str, info) -> bool:
    """`info()`, False when the object is not there; a store that fails to answer is an error (fsspec's
    exists/isfile would say False, and a store in an outage would look empty or damaged)."""
    try:
        return info() is not False
    except FileNotFoundError:
        return False
    except Exception as e:
        what = fault(e) or f"{type(e).__name__}: {e}"
        raise StoreFault(
            f"the object store holding {loc} failed ({what}) after its retries; re-run the same command "
            "once it answers"
        ) from None


def is_empty_dir(loc: Location) -> bool:
    """True for a directory (or prefix) that holds nothing; False for a file or anything with content."""
    if not is_remote(loc):
        return loc.is_dir() and not any(loc.iterdir())
    fs, path = _fs(loc)
    return not fs.isfile(path) and not fs.find(path)


def remove(loc: Location) -> None:
    if not is_remote(loc):
        shutil.rmtree(loc)
        return
    fs, path = _fs(loc)
    if fs.find(path):
        fs.rm(path, recursive=True)


def size_bytes(loc: Location) -> int:
    if not is_remote(loc):
        return sum(f.stat().st_size for f in loc.rglob("*") if f.is_file())
    fs, path = _fs(loc)
    return int(fs.du(path)) if fs.exists(path) else 0


# --- small documents beside the Zarr data (commit markers) -----------------------------------------


def write_bytes(loc: Location, key: str, data: bytes) -> None:
    """Write one small object atomically (temp file + rename locally; a single PUT remotely)."""
    if is_remote(loc):
        fs, path = _fs(loc)
        fs.pipe_file(f"{path}/{key}", data)
        return
    target = loc / key
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


def read_bytes(loc: Location, key: str) -> bytes:
    if not is_remote(loc):
        return (loc / key).read_bytes()
    fs, path = _fs(loc)
    return fs.cat_file(f"{path}/{key}")


def list_names(loc: Location, prefix: str) -> list[str]:
    """Names of the objects directly under `prefix` (empty when there is none), temp files excluded."""
    if not is_remote(loc):
        folder = loc / prefix
        return (
            sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        )
    fs, path = _fs(loc)
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/{prefix}", detail=False))
    except FileNotFoundError:
        return []


def delete_tree(loc: Location, prefix: str) -> None:
    if not is_remote(loc):
        shutil.rmtree(loc / prefix, ignore_errors=True)
        return
    fs, path = _fs(loc)
    if fs.find(f"{path}/{prefix}"):
        fs.rm(f"{path}/{prefix}", recursive=True)


def delete(loc: Location, keys: list[str]) -> None:
    if not keys:
        return
    if not is_remote(loc):
        for key in keys:
            (loc / key).unlink(missing_ok=True)
        return
    fs, path = _fs(loc)
    fs.rm([f"{path}/{key}" for key in keys])
