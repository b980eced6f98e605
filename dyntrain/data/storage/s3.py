"""S3 access for the data path: one boto3 client per process, uploads, ranged reads, listings, and
errors that name the URL.

The client comes from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, profiles); boto3 reads the endpoint
itself. Requests are retried (botocore "standard" mode, ``DYNTRAIN_S3_RETRIES`` attempts, default 5),
uploads above 16 MiB go multipart (boto3 ``TransferConfig``). On top of botocore's attempts, every
operation here retries transient errors (outage, throttling, timeouts: ``retry.is_transient``) with
backoff for up to ``data.io_retry_s`` (``retry.set_bound``) before it fails naming the URL; a body
cut short counts as transient too.

An S3 object appears whole or not at all, so a shard uploaded under its final key is never seen
half-written; the shard builder writes ``manifest.json`` last so that a manifest only ever lists
shards that are complete.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from dyntrain.data.storage import retry
from dyntrain.errors import DyntrainError


MiB = 1024 * 1024


class DataSourceError(DyntrainError, RuntimeError):
    """A shard, index or prefix that cannot be read or written; the message names the URL."""


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url}")
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataSourceError(f"{url}: no bucket name in the URL")
    return bucket, key


def join_url(base: str, name: str) -> str:
    """Join a folder (local path or s3:// prefix) and a file name."""
    if is_s3(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


_clients: dict[tuple, Any] = {}
_lock = threading.Lock()


def client():
    """The process's boto3 S3 client, rebuilt when the AWS environment changes (tests switch
    endpoints). Safe to share between threads."""
    # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
    import boto3
    from botocore.config import Config

    env = tuple(os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"))
    key = (os.getpid(),) + env
    with _lock:
        c = _clients.get(key)
        if c is None:
            retries = int(os.environ.get("DYNTRAIN_S3_RETRIES", "5"))
            cfg = Config(retries={"max_attempts": retries, "mode": "standard"},
                         connect_timeout=float(os.environ.get("DYNTRAIN_S3_CONNECT_TIMEOUT", "10")),
                         read_timeout=60, max_pool_connections=32,
                         s3={"addressing_style": "path"} if _custom_endpoint() else None)
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            c = boto3.session.Session().client("s3", config=cfg, region_name=region)
            _clients.clear()
            _clients[key] = c
        return c


def _custom_endpoint() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def explain(exc: BaseException, url: str, action: str = "read") -> DataSourceError:
    """Turn a boto3/botocore exception into one clear error naming ``url`` (and the endpoint)."""
    # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError, ReadTimeoutError)

    endpoint = _custom_endpoint() or "the default AWS endpoint"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return DataSourceError(f"cannot {action} {url}: S3 endpoint {endpoint} is unreachable ({exc})")
    if isinstance(exc, ReadTimeoutError):
        return DataSourceError(f"cannot {action} {url}: S3 endpoint {endpoint} timed out ({exc})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return DataSourceError(f"cannot {action} {url}: no AWS credentials found (set "
                               f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            return DataSourceError(f"cannot {action} {url}: bucket does not exist ({endpoint})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DataSourceError(f"cannot {action} {url}: no such object ({endpoint})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId",
                    "ExpiredToken", "InvalidToken", "AuthFailure", "UnrecognizedClientException"):
            return DataSourceError(f"cannot {action} {url}: S3 rejected the credentials ({code}) "
                                   f"at {endpoint}")
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return DataSourceError(f"cannot {action} {url}: access denied ({code}) at {endpoint} - "
                                   f"check the credentials and the bucket policy")
        return DataSourceError(f"cannot {action} {url}: {code or status} {err.get('Message', '')} "
                               f"({endpoint})")
    return DataSourceError(f"cannot {action} {url}: {type(exc).__name__}: {exc}")


def _call(fn, url: str, action: str, **kwargs):
    """``fn(**kwargs)`` with transient errors retried for up to the bound (``retry``)."""
    return _retrying(lambda: fn(**kwargs), url, action)


def _retrying(op, url: str, action: str):
    """``op()``; a transient boto3 error is retried with backoff for up to ``retry.bound()``, any
    other error (or a transient one past the bound) raises DataSourceError naming ``url``."""
    # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError
    window = retry.RetryWindow(url)
    while True:
        try:
            out = op()
            window.done()
            return out
        except S3UploadFailedError as exc:   # boto3's transfer manager wraps the cause
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (BotoCoreError, ClientError)):
                if retry.is_transient(cause) and window.wait(cause):
                    continue
                raise _explained(cause, url, action, window) from exc
            raise DataSourceError(f"cannot {action} {url}: {exc}") from exc
        except (BotoCoreError, ClientError) as exc:
            if retry.is_transient(exc) and window.wait(exc):
                continue
            raise _explained(exc, url, action, window) from exc


def _explained(exc: BaseException, url: str, action: str, window: "retry.RetryWindow") -> DataSourceError:
    err = explain(exc, url, action)
    if window.tries:
        err = DataSourceError(f"{err} - {window.gave_up()}")
    return err


# ------------------------------------------------------------------------------------ operations
def transfer_config():
    # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
    from boto3.s3.transfer import TransferConfig
    return TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB,
                          max_concurrency=4, use_threads=True)


def upload_file(local_path: str | Path, url: str) -> None:
    """Upload one file (multipart above 16 MiB; each part retried by botocore, the whole upload
    again while the error is transient)."""
    bucket, key = parse_s3_url(url)
    _retrying(lambda: client().upload_file(str(local_path), bucket, key, Config=transfer_config()),
              url, "write")


def get_bytes(url: str, start: Optional[int] = None, length: Optional[int] = None) -> bytes:
    """Whole object, or ``length`` bytes from ``start`` (a ranged GET)."""
    bucket, key = parse_s3_url(url)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if start is not None:
        end = "" if length is None else str(start + length - 1)
        kwargs["Range"] = f"bytes={start}-{end}"

    def get() -> bytes:  # the body is read inside the retry: a connection cut mid-body is transient
        resp = client().get_object(**kwargs)
        body = resp["Body"].read()
        want = resp.get("ContentLength")
        if want is not None and len(body) != int(want):
            # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
            from botocore.exceptions import IncompleteReadError
            raise IncompleteReadError(actual_bytes=len(body), expected_bytes=int(want))
        return body
    return _retrying(get, url, "read")


def head(url: str) -> Optional[dict]:
    """Object metadata, or None when the object does not exist (other errors raise)."""
    # lazy: boto3 is needed only for s3:// URLs (the GPU image has none)
    from botocore.exceptions import ClientError
    bucket, key = parse_s3_url(url)

    def op() -> Optional[dict]:
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
    found = _retrying(op, url, "read")
    if found is None:
        check_bucket(url)
    return found


def check_bucket(url: str) -> None:
    """Raise DataSourceError naming ``url`` when its bucket is missing or unreachable."""
    bucket, _ = parse_s3_url(url)
    # a listing, not head_bucket: a HEAD answer has no body, so no error code to explain
    _call(client().list_objects_v2, url, "read", Bucket=bucket, MaxKeys=1)


def list_objects(prefix_url: str, label: Optional[str] = None) -> Iterator[tuple[str, int]]:
    """(s3 URL, size) of every object under ``s3://bucket/prefix`` (recursive). Errors name
    ``label`` (the URL the caller was asked for) when given."""
    bucket, prefix = parse_s3_url(prefix_url)

    def listing() -> list[tuple[str, int]]:  # whole, so that a retried listing yields nothing twice
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
                for page in pages for obj in page.get("Contents", [])]
    yield from _retrying(listing, label or prefix_url, "list" if label is None else "read")


def delete(url: str) -> None:
    bucket, key = parse_s3_url(url)
    _call(client().delete_object, url, "delete", Bucket=bucket, Key=key)


# ------------------------------------------------------------------------- local/S3 both ways
def read_bytes(url: str, start: Optional[int] = None, length: Optional[int] = None) -> bytes:
    """Read a whole file or a byte range from a local path or an s3:// URL."""
    if is_s3(url):
        return get_bytes(url, start, length)
    try:
        with open(url, "rb") as f:
            if start is not None:
                f.seek(start)
            return f.read() if length is None else f.read(length)
    except OSError as exc:
        raise DataSourceError(f"cannot read {url}: {exc.strerror or exc}") from exc


def exists(url: str) -> bool:
    if is_s3(url):
        return head(url) is not None
    return Path(url).is_file()
