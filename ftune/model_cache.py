"""Node-local cache of base models kept in S3 (``model.name_or_path: s3://bucket/prefix``).

Every training worker, driver and Serve replica on a node resolves an s3:// model to the same local
directory, so a replacement spot node fetches the model once, not once per process. The prefix holds
what ``save_pretrained`` writes (config.json, safetensors weights, tokenizer files); only its own files
are fetched (not sub-folders), and pickled weights (``*.bin``, ``*.pt``...) never are. A tokenizer or
a model's config needs only the small files: ``weights=False`` fetches those alone (so the driver
never downloads the weights), and a later full fetch hard-links them instead of fetching them again.

Layout under the cache root (``$FTUNE_MODEL_CACHE``, default ``$FTUNE_HOME/models/s3``)::

    <bucket>/<prefix, quoted>-<hash of endpoint, bucket, prefix>/
        .lock                   flock'ed by the process fetching; the others wait on it
        .partial/NAME.TAG       bytes fetched so far of one version (TAG) of object NAME
        <SET>/manifest.json     names, sizes and versions of the files beside it
        <SET>/<prefix's last part>/   the directory from_pretrained loads

``SET`` is a hash of the fetched objects' names, sizes and versions (S3's ETags, via
``Storage.version``): a re-uploaded model is a new set and is fetched again; an unchanged one costs a
listing and a HEAD per file. A copy whose manifest disagrees with the remote, or any of whose files
has another size than the manifest says (truncated, overwritten), is never returned: its right-sized
files become finished partials and the rest is fetched again.

Concurrency and crashes: the fetching process holds an ``fcntl.flock`` on ``.lock``; others block
on it, then find the finished copy. The kernel releases a flock when its holder dies (even by
SIGKILL), so a killed fetch never blocks the node; the next process resumes each partial file with
ranged reads from its current length, provided the object's version is unchanged (the tag is in the
partial's name). A copy is built in a hidden directory (its manifest first, then each complete
file renamed in) and published with one directory rename (``publish_dir``), so a reader sees all of
it or none; the files of a build killed midway are taken up again by the next fetch. The cache must
be on a local disk: flock is not reliable on network filesystems.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from ftune.atomic_files import publish_dir, write_text_atomic
from ftune.builtin_assets import ftune_home
from ftune.errors import UserError
from ftune.storage import Storage, split_s3_uri

CHUNK = 16 * 1024 * 1024
"""Bytes per ranged read: a killed fetch loses at most this much of the file it was writing."""
WEIGHTS = (".safetensors",)
"""Weight files; the only ones loaded (``use_safetensors=True``)."""
NEVER_FETCHED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
"""Pickled or other-framework weights: never fetched, since from_pretrained must not load them."""
MANIFEST = "manifest.json"
FIELD = "model.name_or_path"
_ATTEMPTS = 3
"""Fetches in a row that may find the model replaced in S3 while it was being fetched."""


@dataclass(frozen=True)
class RemoteFile:
    """One object of the model: its name under the prefix, its size and its version tag."""

    name: str
    size: int
    version: str

    @property
    def partial_name(self) -> str:
        """Name of its partial download: a new version never resumes an old one's bytes."""
        tag = hashlib.sha256(f"{self.version}\0{self.size}".encode()).hexdigest()[:16]
        return f"{self.name}.{tag}"


def cache_root() -> Path:
    """The node-local cache root: ``$FTUNE_MODEL_CACHE``, default ``$FTUNE_HOME/models/s3``."""
    configured = os.environ.get("FTUNE_MODEL_CACHE")
    return Path(configured).expanduser() if configured else ftune_home() / "models" / "s3"


def fetch_model(
    uri: str, *, endpoint_url: str | None = None, weights: bool = True, root: Path | None = None
) -> Path:
    """The local directory holding the model at ``uri``, fetched into the node's cache if needed.

    Args:
        uri: ``s3://bucket/prefix`` (``?region=`` allowed), the directory save_pretrained wrote.
        endpoint_url: An S3-compatible endpoint; None: ``AWS_ENDPOINT_URL``, else AWS.
        weights: False fetches only the small files (config, tokenizer), unless the whole model is
            already cached; enough for a tokenizer or the model's config.
        root: Cache root; default ``cache_root()``.

    Raises:
        UserError: the URI is malformed, the prefix is empty or is no model, the endpoint cannot be
            reached or refuses the credentials, or the model kept changing while it was fetched.
    """
    try:
        split_s3_uri(uri)
    except ValueError as e:
        raise UserError(f"{FIELD}: {e}") from e
    storage = Storage(uri, endpoint_url)
    home = _model_home(root or cache_root(), storage)
    everything = _remote_files(storage)
    for files in _usable(everything, weights):
        if (found := _complete(home, files)) is not None:
            return found
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock"):
        for _ in range(_ATTEMPTS):
            for files in _usable(everything, weights):
                if (found := _complete(home, files)) is not None:
                    return found  # another process fetched it while this one waited for the lock
            wanted = _usable(everything, weights)[-1]
            _salvage(home, wanted, current=everything)
            for f in wanted:
                _fetch_file(storage, f, home / ".partial")
            now = _remote_files(storage)
            if now == everything:
                return _publish(home, wanted, storage, keep={_set_id(s) for s in _usable(everything, False)})
            everything = now  # replaced while being fetched: fetch the new versions of what changed
    raise UserError(f"{FIELD}={uri!r}: the model changed in S3 during {_ATTEMPTS} fetches in a row; "
                    "upload it to a new prefix, or retry once the upload is done")


def _usable(everything: list[RemoteFile], weights: bool) -> list[list[RemoteFile]]:
    """The file sets that serve a request, best first: the whole model, then (no weights) its small files."""
    return [everything] if weights else [everything, [f for f in everything if not f.name.endswith(WEIGHTS)]]


def _model_home(root: Path, storage: Storage) -> Path:
    """The cache directory of one model location (endpoint, bucket, prefix)."""
    bucket, prefix, _ = split_s3_uri(storage.uri)
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
    digest = hashlib.sha256(f"{endpoint}\0{bucket}\0{prefix}".encode()).hexdigest()[:12]
    return root / bucket / f"{quote(prefix.strip('/'), safe='') or '_'}-{digest}"


def _remote_files(storage: Storage) -> list[RemoteFile]:
    """The model's files under the prefix with their versions, checked to be a safetensors model."""
    uri = storage.uri_of()
    try:
        sizes = storage.list_files()
        files = [RemoteFile(n, s, storage.version(n))
                 for n, s in sorted(sizes.items()) if not n.endswith(NEVER_FETCHED)]
    except OSError as e:
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        raise UserError(
            f"{FIELD}={uri!r}: cannot list the model at {endpoint} ({e}). Check the bucket name, "
            "the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an instance role), the "
            "endpoint (model.endpoint_url or AWS_ENDPOINT_URL) and the region (?region=NAME on the URI)"
        ) from e
    names = {f.name for f in files}
    if not sizes:
        raise UserError(f"{FIELD}={uri!r}: no files under {uri}/; it must be the directory save_pretrained "
                        "wrote (config.json, *.safetensors, tokenizer files). Check the bucket and prefix")
    if "config.json" not in names:
        raise UserError(f"{FIELD}={uri!r}: {uri}/config.json is missing (found {', '.join(sorted(sizes))}); "
                        "point it at the directory save_pretrained wrote")
    if not any(n.endswith(WEIGHTS) for n in names):
        raise UserError(f"{FIELD}={uri!r}: no *.safetensors weights under {uri}/ "
                        f"(found {', '.join(sorted(sizes))}); "
                        "pickled weights are never loaded: re-save the model with save_pretrained(..., "
                        "safe_serialization=True) and upload that")
    return files


def _set_id(files: list[RemoteFile]) -> str:
    blob = json.dumps([asdict(f) for f in files], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _complete(home: Path, files: list[RemoteFile]) -> Path | None:
    """The model directory of a finished copy of exactly ``files``, each of its listed size; else None."""
    entry = home / _set_id(files)
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        model_dir = entry / manifest["directory"]
        if manifest["files"] != [asdict(f) for f in files]:
            return None
        if all((model_dir / f.name).stat().st_size == f.size for f in files):
            return model_dir
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _salvage(home: Path, files: list[RemoteFile], current: list[RemoteFile]) -> None:
    """Drop what a fetch of ``files`` cannot use; right-sized files of a damaged copy become partials.

    Runs under the lock. Partials of objects not in ``current`` (the remote listing) are deleted, as is
    a copy of this set that failed ``_complete`` (a file truncated or overwritten since published). Files
    another finished copy holds (the config and tokenizer fetched alone) are linked, not fetched again.
    """
    staging = home / ".partial"
    staging.mkdir(exist_ok=True)
    wanted = {f.partial_name: f for f in files}
    listed = {f.partial_name for f in current}
    for part in staging.iterdir():
        if part.name not in listed:  # an old version's bytes; a partial of the weights stays for later
            part.unlink()
    for other in (d for d in home.iterdir() if d.is_dir() and d.name != staging.name):
        _reuse(other, wanted, staging)
        if other.name.startswith("."):  # a publish killed midway (publish_dir's building or old copy)
            shutil.rmtree(other, ignore_errors=True)
    entry = home / _set_id(files)
    if entry.exists():
        for model_dir in (d for d in entry.iterdir() if d.is_dir()):
            for f in files:
                path = model_dir / f.name
                if path.is_file() and path.stat().st_size == f.size:
                    os.replace(path, staging / f.partial_name)
        shutil.rmtree(entry)


def _reuse(entry: Path, wanted: dict[str, RemoteFile], staging: Path) -> None:
    """Hard-link the wanted files of another finished copy (e.g. config and tokenizer only) as partials."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        listed = [RemoteFile(**f) for f in manifest["files"]]
        model_dir = entry / manifest["directory"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for f in listed:
        target = staging / f.partial_name
        if wanted.get(f.partial_name) == f and not target.exists() and (model_dir / f.name).is_file():
            if (model_dir / f.name).stat().st_size == f.size:
                os.link(model_dir / f.name, target)


def _fetch_file(storage: Storage, f: RemoteFile, staging: Path) -> None:
    """Bring ``staging/<partial>`` to the object's full size, continuing from the bytes already there."""
    part = staging / f.partial_name
    have = part.stat().st_size if part.exists() else 0
    if have > f.size:  # not a prefix of this version: start over
        part.unlink()
        have = 0
    if have == f.size and part.exists():
        return
    uri = storage.uri_of(f.name)
    try:
        with storage.open_file(f.name) as src, open(part, "ab") as out:
            while have < f.size:
                data = src.read_at(min(CHUNK, f.size - have), have)  # one ranged GET
                if not data:
                    raise OSError(f"{uri} ended at byte {have}; the listing said {f.size}")
                out.write(data)
                have += len(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise UserError(f"{FIELD}: fetching {uri} stopped at byte {have} of {f.size}: {e}. Fetch again "
                        "(the next fetch resumes from there)") from e


def _publish(home: Path, files: list[RemoteFile], storage: Storage, keep: set[str]) -> Path:
    """Move the finished partials into a new copy and publish it; delete copies of other versions."""
    entry = home / _set_id(files)
    directory = split_s3_uri(storage.uri)[1].rstrip("/").rsplit("/", 1)[-1] or "model"

    def build(tmp: Path) -> None:
        (tmp / directory).mkdir()
        # The manifest first: if this process dies before the rename, the next fetch reuses the files.
        manifest = {"uri": storage.uri_of(), "directory": directory, "files": [asdict(f) for f in files]}
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        for f in files:
            path = home / ".partial" / f.partial_name
            if path.stat().st_size != f.size:
                raise UserError(f"{FIELD}: {storage.uri_of(f.name)} fetched {path.stat().st_size} bytes, "
                                f"the listing said {f.size}; fetch again")
            os.replace(path, tmp / directory / f.name)

    publish_dir(build, entry, is_current=lambda _: False)
    for old in home.iterdir():
        if old.is_dir() and not old.name.startswith(".") and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return entry / directory


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; the kernel releases it if this process dies."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
