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

__all__ = ["is_s3", "fetch", "upload", "join", "exists", "list_dirs", "remove_prefix", "check_bucket"]

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


def fetch(uri: str, cache: bool = True) -> Path:
    """A local path holding ``uri``: the path itself, or an ``s3://`` object downloaded to a cache
    (``cache=False``: downloaded afresh, for objects that may be rewritten or must be verified).

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
    if dest.is_file() and cache:
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


def remove_prefix(uri: str) -> None:
    """Delete every object under an ``s3://`` prefix (a checkpoint folder)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(uri.rstrip("/") + "/")
    client = _client()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
    except (BotoCoreError, ClientError) as e:
        _logger.warning("cannot delete %s: %s", uri, _short(e))


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


def check_bucket(uri: str) -> None:
    """Fail fast, in one line, when the bucket of an ``s3://`` URI cannot be used from here: missing,
    no credentials in the environment, access denied, endpoint unreachable. Local paths pass.

    Raises:
        UserError: naming the bucket and the endpoint, never a credential.
    """
    if not is_s3(uri):
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = _split(uri)
    # A fresh session: the environment as it is now (the default session caches the credentials it found).
    client = boto3.session.Session().client("s3", config=Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 2}))
    where = f"bucket {bucket!r} at {client.meta.endpoint_url}"
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise UserError(
            f"{uri!r}: no S3 credentials in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile or a role; never in the config)"
        ) from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UserError(f"{uri!r}: {where} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UserError(f"{uri!r}: {where} refused these credentials (HTTP {code})") from None
        raise UserError(f"{uri!r}: {where}: {_short(e)}") from None
    except EndpointConnectionError:
        raise UserError(f"{uri!r}: S3 endpoint {client.meta.endpoint_url} is unreachable (AWS_ENDPOINT_URL?)") from None
    except BotoCoreError as e:
        raise UserError(f"{uri!r}: {where}: {_short(e)}") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200]
