"""Result outputs in an S3 object store (MinIO's API through the `minio` SDK).

Every call is bounded (short connect and read timeouts, one retry), so a dead object
store costs a completion a few seconds at most, after which the output is kept in the
database row instead. Nothing is lost either way.
"""
from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import urllib3
from minio import Minio
from minio.error import S3Error

from . import metrics
from .settings import MinioSettings

log = logging.getLogger(__name__)

URL_SCHEME = "minio://"
PRESIGNED_URL_LIFETIME = timedelta(hours=1)
_CHUNK_BYTES = 64 * 1024


class ObjectStoreUnavailable(Exception):
    """The object store did not answer, refused us, or does not hold the object."""


@dataclass(frozen=True)
class ObjectLocation:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"{URL_SCHEME}{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, url: str) -> ObjectLocation:
        if not url.startswith(URL_SCHEME) or "/" not in url[len(URL_SCHEME):]:
            raise ValueError(f"not an object store url: {url!r}")
        bucket, key = url[len(URL_SCHEME):].split("/", 1)
        return cls(bucket, key)


def object_key(task_id: str, completed_at_ms: int) -> str:
    return f"artifacts/{task_id}/{completed_at_ms}.json"


class MinioArtifactStore:
    def __init__(self, settings: MinioSettings, *, connect_timeout_s: float = 2.0, read_timeout_s: float = 3.0) -> None:
        self.bucket = settings.bucket
        http = urllib3.PoolManager(
            maxsize=16,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=urllib3.Retry(total=1, read=0, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self._client = Minio(
            f"{settings.endpoint}:{settings.port}",
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.use_ssl,
            region="us-east-1",  # skips a bucket-location round trip per call
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def _ensure_bucket(self) -> None:
        """Create the bucket if missing, once per process (again after a failure)."""
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as error:
                    if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    def put(self, task_id: str, output: str, *, completed_at_ms: int, content_type: str) -> str | None:
        """Upload `output`; its `minio://` url, or None (logged) when the store failed."""
        location = ObjectLocation(self.bucket, object_key(task_id, completed_at_ms))
        data = output.encode("utf-8")
        try:
            self._ensure_bucket()
            self._client.put_object(
                location.bucket, location.key, io.BytesIO(data), len(data), content_type=content_type
            )
        except Exception as error:  # any failure: keep the output in the database instead
            metrics.ARTIFACT_UPLOAD_FAILURES.inc()
            log.warning(
                "object store upload of task %s failed (%s); keeping the output in the database",
                task_id, _describe(error),
            )
            return None
        return location.url

    def remove(self, url: str) -> None:
        location = ObjectLocation.parse(url)
        try:
            self._client.remove_object(location.bucket, location.key)
        except Exception as error:
            log.warning("could not remove orphan object %s (%s)", url, _describe(error))

    def presigned_download_url(self, url: str) -> str:
        location = ObjectLocation.parse(url)
        return self._client.presigned_get_object(location.bucket, location.key, expires=PRESIGNED_URL_LIFETIME)

    def open(self, url: str) -> Iterator[bytes]:
        """The object's bytes as a stream; ObjectStoreUnavailable if it cannot be read now."""
        location = ObjectLocation.parse(url)
        try:
            response = self._client.get_object(location.bucket, location.key)
        except Exception as error:
            raise ObjectStoreUnavailable(f"Object store unavailable: {_describe(error)}") from None

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(_CHUNK_BYTES)
            finally:
                response.close()
                response.release_conn()

        return chunks()


def _describe(error: Exception) -> str:
    if isinstance(error, S3Error):
        return f"S3 {error.code}"
    return type(error).__name__
