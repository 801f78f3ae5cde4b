"""Run storage on a local/shared directory or ``s3://bucket/prefix``, through one pyarrow filesystem.

Ray Train gets the same filesystem (``RunConfig(storage_filesystem=...)``), so checkpoints and the
files ftune writes itself (metrics, summary, adapter) land side by side in the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ftune.config import StorageConfig


@dataclass(frozen=True)
class Storage:
    """A storage root and the filesystem that reaches it."""

    uri: str
    endpoint_url: str | None = None

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        """Storage for a config's storage section (local paths are made absolute)."""
        uri = cfg.path if cfg.path.startswith("s3://") else str(Path(cfg.path).expanduser().resolve())
        return cls(uri=uri, endpoint_url=cfg.endpoint_url)

    @property
    def is_remote(self) -> bool:
        """True for object storage (files are staged locally, then uploaded)."""
        return self.uri.startswith("s3://")

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the root path inside it."""
        if not self.is_remote:
            return pafs.LocalFileSystem(), self.uri
        parsed = urlparse(self.uri)
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs = {"endpoint_override": ep.netloc or ep.path, "scheme": ep.scheme or "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        fs = pafs.S3FileSystem(region=region, **kwargs)
        return fs, f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")

    def path(self, *parts: str) -> str:
        """Path of ``parts`` below the root, inside the filesystem."""
        _, root = self.filesystem()
        return "/".join([root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """A user-facing location (local path or s3:// URI) of ``parts`` below the root."""
        return "/".join([self.uri.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        """Whether a file or directory exists below the root."""
        fs, _ = self.filesystem()
        return fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small text file below the root."""
        fs, _ = self.filesystem()
        target = self.path(*parts)
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as out:
            out.write(text.encode("utf-8"))

    def read_text(self, *parts: str) -> str:
        """Read a small text file below the root."""
        fs, _ = self.filesystem()
        with fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode("utf-8")

    def upload_file(self, local_file: str | Path, *parts: str) -> None:
        """Copy one local file to ``parts`` below the root."""
        fs, _ = self.filesystem()
        target = self.path(*parts)
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(local_file, "rb") as src, fs.open_output_stream(target) as out:
            out.write(src.read())

    def download_file(self, local_file: str | Path, *parts: str) -> bool:
        """Copy the file at ``parts`` below the root to ``local_file``; False if there is none."""
        if not self.exists(*parts):
            return False
        fs, _ = self.filesystem()
        Path(local_file).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(self.path(*parts)) as src:
            Path(local_file).write_bytes(src.read())
        return True

    def upload_dir(self, local_dir: str | Path, *parts: str) -> None:
        """Copy a local directory tree to ``parts`` below the root (no-op onto itself)."""
        fs, _ = self.filesystem()
        target = self.path(*parts)
        if not self.is_remote and Path(target).resolve() == Path(local_dir).resolve():
            return
        fs.create_dir(target, recursive=True)
        pafs.copy_files(str(local_dir), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def download_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy ``parts`` below the root into a local directory and return it."""
        fs, _ = self.filesystem()
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(*parts), str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return Path(local_dir)
