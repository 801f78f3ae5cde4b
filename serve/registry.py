"""The adapters a deployment serves: a fixed name -> source mapping, local or s3://, checked up front.

Requests only ever carry an adapter *name*; the path behind it was fixed at deploy time, so no
request can make a replica read an arbitrary file. Adapters must be plain LoRA in PEFT's
safetensors format (``adapter_config.json`` + ``adapter_model.safetensors``): pickled ``.bin``
weights are never loaded, and DoRA cannot share a mixed-adapter batch. Given the base model's layout,
each adapter is also compared with it (serve/adapter_checks.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pyarrow import ArrowException

from ftune.atomic_files import publish_dir
from ftune.errors import ConfigError
from ftune.storage import Storage
from serve.adapter_checks import (
    BaseModelLayout,
    adapter_problems,
    local_safetensors_header,
    other_base_model,
    read_safetensors_header,
    weights_problems,
)

log = logging.getLogger(__name__)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def is_s3(source: str) -> bool:
    """Whether an adapter source is an s3:// URI."""
    return source.startswith("s3://")


def adapter_config_problems(config: dict[str, Any]) -> list[str]:
    """Why an adapter_config.json cannot be served in a mixed-adapter batch (empty if it can)."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters can be served")
    if config.get("use_dora"):
        problems.append(
            "is a DoRA adapter, which peft cannot mix with others in one batch; serve its merged model "
            "instead (ftune export --adapter DIR --merge OUT)"
        )
    return problems


def read_local_adapter(path: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Problems with the files of a local adapter directory, and its adapter_config.json when readable."""
    if not path.is_dir():
        return [f"{path} is not a directory"], None
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        hint = ""
        if WEIGHTS_FILE in missing and (path / "adapter_model.bin").is_file():
            hint = (
                " (only adapter_model.bin is there: pickled weights are not loaded; re-save with safetensors)"
            )
        return [f"{path} lacks {', '.join(missing)}{hint}"], None
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError as e:
        return [f"{path / CONFIG_FILE} is not valid JSON: {e}"], None
    return [], config


def check_local_adapter(
    path: Path, base: BaseModelLayout | None = None, max_rank: int = 0, *, read_weights: bool = False
) -> tuple[list[str], dict[str, Any] | None]:
    """Why a local adapter directory cannot be served (empty if it can), and its adapter_config.json.

    Args:
        path: The adapter directory.
        base: The base model to compare the adapter with; None checks the files alone.
        max_rank: Largest rank allowed (with ``base``).
        read_weights: Also read every weight and refuse NaN or infinite values.
    """
    problems, config = read_local_adapter(path)
    problems = problems or adapter_config_problems(config or {})
    if problems or base is None:
        return problems, config
    try:
        tensors = local_safetensors_header(path / WEIGHTS_FILE)
    except (OSError, ValueError) as e:
        return [f"{WEIGHTS_FILE}: {e}"], config
    problems = adapter_problems(config, tensors, base, max_rank)
    if not problems and read_weights:
        problems = weights_problems(path / WEIGHTS_FILE)
    return problems, config


def require_safetensors(model_path: str) -> None:
    """Refuse a local model directory that only has pickled (.bin) weights.

    Raises:
        RuntimeError: the directory holds no ``*.safetensors`` file.
    """
    path = Path(model_path)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise RuntimeError(
            f"{path} has no *.safetensors weights; only safetensors are loaded (re-save the model)"
        )


def check_s3_adapter(
    uri: str, endpoint_url: str | None, base: BaseModelLayout | None = None, max_rank: int = 0
) -> tuple[list[str], dict[str, Any] | None]:
    """Problems with an s3:// adapter (reachable, complete, LoRA, fits ``base``), and its adapter_config.json.

    Only the config and the header of the weights are fetched (range requests), never the weights.
    """
    storage = Storage(uri, endpoint_url)
    try:
        files = storage.list_files()
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            return [f"{uri} lacks {', '.join(missing)}"], None
        body = storage.read_bytes(CONFIG_FILE)
    except (OSError, ArrowException, ValueError) as e:
        return [f"cannot read {uri}: {e}"], None
    try:
        config = json.loads(body)
    except ValueError as e:
        return [f"{storage.uri_of(CONFIG_FILE)} is not valid JSON: {e}"], None
    problems = adapter_config_problems(config)
    if problems or base is None:
        return problems, config
    try:
        with storage.open_file(WEIGHTS_FILE) as weights:
            tensors = read_safetensors_header(
                lambda offset, length: weights.read_at(length, offset), files[WEIGHTS_FILE]
            )
    except (OSError, ArrowException) as e:
        return [f"cannot read {storage.uri_of(WEIGHTS_FILE)}: {e}"], config
    except ValueError as e:
        return [f"{WEIGHTS_FILE}: {e}"], config
    return adapter_problems(config, tensors, base, max_rank), config


def download_s3_adapter(uri: str, cache_dir: Path, endpoint_url: str | None) -> Path:
    """Download an s3:// adapter into the cache (once per content) and return the local directory.

    The cache key hashes the URI and the objects' ETags, so a re-uploaded adapter is fetched again
    while an unchanged one is reused. Files land in a temporary directory renamed into place, so a
    concurrent replica never sees a half-written adapter. Only the two safetensors-format files are
    ever fetched.
    """
    storage = Storage(uri, endpoint_url)
    missing = [name for name in REQUIRED_FILES if name not in storage.list_files()]
    if missing:
        raise FileNotFoundError(f"{uri} lacks {', '.join(missing)}")
    files = {name: storage.version(name) for name in REQUIRED_FILES}
    key = hashlib.sha256(json.dumps([uri, sorted(files.items())]).encode()).hexdigest()[:20]
    final = Path(cache_dir).expanduser() / key
    if all((final / name).is_file() for name in REQUIRED_FILES):
        return final
    def download(tmp: Path) -> None:
        for name in files:
            if not storage.download_file(tmp / name, name):
                raise FileNotFoundError(f"{uri} lost {name} while it was being downloaded")

    publish_dir(download, final, is_current=lambda path: all((path / name).is_file() for name in REQUIRED_FILES))
    return final


class AdapterRegistry:
    """Adapter name -> source, fixed at deploy time; resolves a name to a local PEFT directory.

    Args:
        sources: Adapter name -> local directory or s3://bucket/prefix.
        cache_dir: Where s3:// adapters are downloaded to.
        endpoint_url: S3-compatible endpoint; None uses AWS_ENDPOINT_URL or AWS.
    """

    def __init__(self, sources: dict[str, str], *, cache_dir: str | Path, endpoint_url: str | None = None):
        self._sources = {
            name: src if is_s3(src) else str(Path(src).expanduser().resolve())
            for name, src in sources.items()
        }
        self._cache_dir = Path(cache_dir).expanduser()
        self._endpoint_url = endpoint_url

    @property
    def names(self) -> list[str]:
        """Registered adapter names, in registration order."""
        return list(self._sources)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def source(self, name: str) -> str:
        """The local path or s3 URI registered under ``name``."""
        return self._sources[name]

    def inspect(self, base: BaseModelLayout | None = None, max_rank: int = 0) -> dict[str, dict[str, Any]]:
        """Check every adapter and return its adapter_config.json, by name.

        Args:
            base: The base model's layout: each adapter must fit it (modules, shapes, rank).
            max_rank: Largest LoRA rank allowed (with ``base``).

        Raises:
            ConfigError: listing every adapter that is missing, incomplete, unreadable, not LoRA, or
                (given ``base``) made for another model or of too high a rank.
        """
        problems, configs = [], {}
        for name, source in self._sources.items():
            if is_s3(source):
                found, config = check_s3_adapter(source, self._endpoint_url, base, max_rank)
            else:
                found, config = check_local_adapter(Path(source), base, max_rank)
            problems += [f"  - adapters.{name}: {p}" for p in found]
            if config is not None:
                configs[name] = config
                note = other_base_model(config, base) if base is not None and not found else None
                if note:
                    log.warning("adapters.%s %s", name, note)
        if problems:
            noun = "problem" if len(problems) == 1 else "problems"
            raise ConfigError(f"{len(problems)} adapter {noun}:\n" + "\n".join(problems))
        return configs

    def local_dir(self, name: str) -> Path:
        """A local directory holding adapter ``name`` (downloading an s3:// adapter if needed).

        Raises:
            KeyError: ``name`` is not registered.
        """
        source = self._sources[name]
        if is_s3(source):
            return download_s3_adapter(source, self._cache_dir, self._endpoint_url)
        return Path(source)


def common_base_model(configs: dict[str, dict[str, Any]]) -> str | None:
    """The base_model_name_or_path every adapter was trained on, or None if unknown or they disagree."""
    bases = {c.get("base_model_name_or_path") for c in configs.values()}
    return bases.pop() if len(bases) == 1 and None not in bases else None
