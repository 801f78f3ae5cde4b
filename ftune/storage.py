"""Run storage on a local/shared directory or ``s3://bucket/prefix``, through one pyarrow filesystem.

Ray Train gets the same filesystem (``RunConfig(storage_filesystem=...)``), so checkpoints and the
files ftune writes itself (metrics, summary, adapter) land side by side in the run directory.

Writes are atomic: a file holds its old content or its new content, never part of either. Locally
the bytes go to a temporary name beside the target, which is renamed over it once complete (also
for downloads); on S3 the complete bytes go in one PUT, which S3 shows whole or not at all. A JSON
Lines file is uploaded up to its last newline, so a row still being appended is never uploaded cut.

The S3 region is, first found: ``storage.region`` or ``?region=`` on the URI
(``s3://bucket/prefix?region=eu-west-1``), AWS_REGION, AWS_DEFAULT_REGION, then for AWS itself the
region S3 reports for the bucket; an S3-compatible endpoint with none of these gets the AWS SDK's
default. A ``Storage`` keeps a given region in its ``uri`` (as ``?region=``), so the one string handed
to Ray workers, trials and child locations (``child``) carries it along.

Everything ftune reads or writes in object storage goes through here: runs, sweeps and the adapters
a deployment serves (``list_files``, ``open_file`` and ``version`` let serve/registry.py check an
adapter from its config and weights header alone, and download it only when its content changed).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pyarrow.fs as pafs
from pyarrow import ArrowException, NativeFile

from ftune.atomic_files import write_atomic, write_bytes_atomic
from ftune.config import StorageConfig
from ftune.errors import ConfigError

logger = logging.getLogger(__name__)

_BUCKET_REGIONS: dict[str, str | None] = {}
"""Bucket -> region S3 reported (None: it could not be asked), looked up once per process."""
_COPY_CHUNK = 8 * 1024 * 1024
"""Bytes per read when a download is streamed to disk (adapters and checkpoints can be large)."""


@dataclass(frozen=True)
class Storage:
    """A storage root and the filesystem that reaches it."""

    uri: str
    endpoint_url: str | None = None

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        """Storage for a config's storage section (local paths are made absolute).

        Raises:
            ConfigError: an s3:// path with a query other than ``?region=``, or whose ``?region=``
                contradicts ``storage.region``.
        """
        if not cfg.path.startswith("s3://"):
            return cls(uri=str(Path(cfg.path).expanduser().resolve()), endpoint_url=cfg.endpoint_url)
        try:
            _, _, in_path = split_s3_uri(cfg.path)
        except ValueError as e:
            raise ConfigError(f"storage.path: {e}") from e
        if cfg.region and in_path and cfg.region != in_path:
            raise ConfigError(
                f"storage.region is {cfg.region!r} but storage.path says ?region={in_path}; keep one of them"
            )
        return cls(uri=with_region(cfg.path, cfg.region or in_path), endpoint_url=cfg.endpoint_url)

    @property
    def is_remote(self) -> bool:
        """True for object storage (files are staged locally, then uploaded)."""
        return self.uri.startswith("s3://")

    @property
    def region(self) -> str | None:
        """The region given with ``?region=`` on an s3:// URI, else None."""
        return split_s3_uri(self.uri)[2] if self.is_remote else None

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the root path inside it."""
        if not self.is_remote:
            return pafs.LocalFileSystem(), self.uri
        bucket, key, explicit = split_s3_uri(self.uri)
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            ep = urlsplit(endpoint)
            kwargs = {"endpoint_override": ep.netloc or ep.path, "scheme": ep.scheme or "https"}
        region = s3_region(bucket, explicit, endpoint)
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")

    def path(self, *parts: str) -> str:
        """Path of ``parts`` below the root, inside the filesystem."""
        root = self.uri if not self.is_remote else "/".join(split_s3_uri(self.uri)[:2])
        return "/".join([root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """Where ``parts`` below the root is, for users: a local path or an s3:// URI (no ``?region=``)."""
        root = self.uri.split("?", 1)[0] if self.is_remote else self.uri
        return "/".join([root.rstrip("/"), *parts])

    def child(self, *parts: str) -> Storage:
        """The storage rooted at ``parts`` below this root, in the same region and at the same endpoint.

        Use this, not ``Storage(uri_of(...))``, to hand a location on: ``uri_of`` is for people and
        leaves the region out.
        """
        return Storage(with_region(self.uri_of(*parts), self.region), self.endpoint_url)

    def exists(self, *parts: str) -> bool:
        """Whether a file or directory exists below the root."""
        fs, _ = self.filesystem()
        return fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small text file below the root, atomically."""
        self._put(text.encode("utf-8"), *parts)

    def read_text(self, *parts: str) -> str:
        """Read a small text file below the root."""
        return self.read_bytes(*parts).decode("utf-8")

    def read_bytes(self, *parts: str) -> bytes:
        """Read a small file below the root."""
        fs, _ = self.filesystem()
        with fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def open_file(self, *parts: str) -> NativeFile:
        """Open the file at ``parts`` below the root for random access (a context manager).

        ``read_at(length, offset)`` reads only those bytes (one range request on S3), so a file's
        header can be checked without fetching the file; ``size()`` is its length.
        """
        fs, _ = self.filesystem()
        return fs.open_input_file(self.path(*parts))

    def list_files(self, *parts: str) -> dict[str, int]:
        """{name: size in bytes} of the files directly in the directory ``parts`` (none if it is absent)."""
        fs, _ = self.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}

    def version(self, *parts: str) -> str:
        """A tag of the file's content that changes when the file is replaced: S3's ETag, locally the
        size and modification time (so a cache keyed by it refetches a re-uploaded file)."""
        fs, _ = self.filesystem()
        if not self.is_remote:
            info = fs.get_file_info(self.path(*parts))
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(self.path(*parts))
            return f"{info.size}-{info.mtime_ns}"
        with fs.open_input_file(self.path(*parts)) as f:
            meta = f.metadata()
            return (meta.get("ETag") or f"{f.size()}-{meta.get('Last-Modified', b'').decode()}".encode()).decode()

    def upload_file(self, local_file: str | Path, *parts: str) -> None:
        """Copy one local file to ``parts`` below the root, atomically.

        The file is read once, then written. A JSON Lines file (``.jsonl``) is uploaded up to its
        last newline: a row being appended while it is read waits for the next upload.
        """
        data = Path(local_file).read_bytes()
        if Path(local_file).suffix == ".jsonl":
            data = data[: data.rfind(b"\n") + 1]
        self._put(data, *parts)

    def download_file(self, local_file: str | Path, *parts: str) -> bool:
        """Copy the file at ``parts`` below the root to ``local_file``, atomically; False if there is none."""
        if not self.exists(*parts):
            return False
        fs, _ = self.filesystem()
        with fs.open_input_stream(self.path(*parts)) as src:
            write_atomic(local_file, lambda out: shutil.copyfileobj(src, out, _COPY_CHUNK))
        return True

    def upload_dir(self, local_dir: str | Path, *parts: str) -> None:
        """Copy a local directory tree to ``parts`` below the root (no-op onto itself)."""
        fs, _ = self.filesystem()
        target = self.path(*parts)
        if not self.is_remote and Path(target).resolve() == Path(local_dir).resolve():
            return
        fs.create_dir(target, recursive=True)
        # One thread: pyarrow's threaded uploads to S3 are not safe (apache/arrow#32372), which is why Ray
        # Train's own uploads turn threads off; this runs in Ray workers too.
        pafs.copy_files(
            str(local_dir), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
            use_threads=False,
        )

    def download_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy ``parts`` below the root into a local directory and return it."""
        fs, _ = self.filesystem()
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(*parts), str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return Path(local_dir)

    def _put(self, data: bytes, *parts: str) -> None:
        """Write ``data`` to ``parts`` below the root: one PUT on S3, a rename locally."""
        target = self.path(*parts)
        if not self.is_remote:
            write_bytes_atomic(target, data)
            return
        fs, _ = self.filesystem()
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as out:
            out.write(data)


def split_s3_uri(uri: str) -> tuple[str, str, str | None]:
    """``s3://bucket/key?region=R`` -> (bucket, key, R or None).

    Raises:
        ValueError: no bucket, or a query parameter other than one ``region``.
    """
    parts = urlsplit(uri)
    if not parts.netloc:
        raise ValueError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"region"})
    if unknown or len(query.get("region", [])) > 1 or query.get("region") == [""]:
        raise ValueError(
            f"{uri!r}: the only query an s3:// path takes is one ?region=NAME (e.g. "
            f"s3://{parts.netloc}{parts.path}?region=eu-west-1); found {parts.query!r}"
        )
    region = query.get("region", [None])[0]
    return parts.netloc, parts.path.lstrip("/"), region


def with_region(uri: str, region: str | None) -> str:
    """``uri`` with ``?region=R`` in place of any query it had (as given if ``region`` is None)."""
    if not region:
        return uri
    return f"{uri.split('?', 1)[0]}?{urlencode({'region': region})}"


def s3_region(bucket: str, explicit: str | None, endpoint: str | None) -> str | None:
    """The region to reach ``bucket`` in; None leaves it to the AWS SDK (its config, else us-east-1).

    Args:
        bucket: The bucket.
        explicit: A region given with the storage location (``?region=``).
        endpoint: An S3-compatible endpoint, or None for AWS itself.
    """
    if explicit:
        return explicit
    configured = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if configured:
        return configured
    if endpoint:
        return None  # AWS's bucket-region lookup says nothing about another server's buckets
    if bucket not in _BUCKET_REGIONS:
        try:
            _BUCKET_REGIONS[bucket] = pafs.resolve_s3_region(bucket)
        except (OSError, ArrowException) as e:
            logger.warning(
                "cannot look up the region of bucket %r (%s); using the AWS SDK's default. Set AWS_REGION "
                "or write s3://%s/...?region=NAME in storage.path",
                bucket,
                e,
                bucket,
            )
            _BUCKET_REGIONS[bucket] = None
    return _BUCKET_REGIONS[bucket]
