"""Files that may live on S3 (or an S3-compatible store such as MinIO): fetch to local disk, upload.

Endpoints and credentials come from the environment as boto3 reads them (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``); nothing here logs them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

__all__ = ["is_s3", "fetch", "upload", "join", "exists", "list_dirs"]

_logger = logging.getLogger(__name__)
_CACHE = Path(os.environ.get("PRUNETUNE_CACHE", Path(tempfile.gettempdir()) / "prunetune-cache"))


def is_s3(uri: str | None) -> bool:
    return bool(uri) and uri.startswith("s3://")


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _client():
    import boto3

    return boto3.client("s3")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` prefix."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def fetch(uri: str) -> Path:
    """A local path holding ``uri``: the path itself, or an ``s3://`` object downloaded to a cache.

    Raises:
        UserError: the local file or the S3 object does not exist or cannot be read.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise UserError(f"file {uri!r} does not exist")
        return path
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(uri)
    dest = _CACHE / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(key).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        _client().download_file(bucket, key, str(tmp))
    except (BotoCoreError, ClientError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot read {uri!r}: {_short(e)}") from None
    tmp.replace(dest)  # atomic: a crash never leaves a half-downloaded file under the final name
    _logger.info("fetched %s", uri)
    return dest


def upload(local: str | Path, uri: str) -> str:
    """Copy a local file to ``uri`` (an ``s3://`` URI or a local path); returns ``uri``."""
    if not is_s3(uri):
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(Path(local).read_bytes())
        tmp.replace(dest)
        return uri
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(uri)
    try:
        _client().upload_file(str(local), bucket, key)
    except (BotoCoreError, ClientError, S3UploadFailedError) as e:  # upload_file wraps ClientError in S3UploadFailedError
        raise UserError(f"cannot write {uri!r}: {_short(e)}") from None
    return uri


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = _split(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under a local path or an ``s3://`` prefix (empty if there is none)."""
    if not is_s3(uri):
        path = Path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(uri.rstrip("/") + "/")
    names: list[str] = []
    try:
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            names += [p["Prefix"][len(key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    except (BotoCoreError, ClientError) as e:
        raise UserError(f"cannot list {uri!r}: {_short(e)}") from None
    return sorted(names)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200]
