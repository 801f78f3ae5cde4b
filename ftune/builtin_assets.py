"""Built-in assets (``builtin:tiny-llama``, ``builtin:sample-instructions``), built on first use under FTUNE_HOME.

Builds are published atomically: each process builds into a private temporary directory next to
the destination and renames it into place, so concurrent workers never see a half-written model
and the loser of a race simply uses the winner's copy.

``ftune build-tiny-model`` (``python -m ftune.builtin_assets``) builds both ahead of time.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from ftune.atomic_files import publish_dir, write_bytes_atomic
from ftune.entrypoint import prog
from ftune.errors import UserError
from ftune.sample_data import SAMPLE_ROWS, SAMPLE_SEED, generate_rows, heldout_rows, jsonl_text
from ftune.tiny_model import ARCHITECTURE, FORMAT_VERSION, MARKER_FILE, PRETRAIN, build_tiny_model

TINY_LLAMA = "builtin:tiny-llama"
SAMPLE_INSTRUCTIONS = "builtin:sample-instructions"
SAMPLE_HELDOUT = "builtin:sample-instructions-heldout"


def ftune_home() -> Path:
    """Returns the cache root: ``$FTUNE_HOME``, default ``~/.cache/ftune``."""
    return Path(os.environ.get("FTUNE_HOME", "~/.cache/ftune")).expanduser()


def _tiny_model_is_current(path: Path, seed: int, pretrain_steps: int) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # A cache built by an older ftune (other sizes or format) is rebuilt rather than silently used.
    if not all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        return False
    return (
        marker.get("format_version") == FORMAT_VERSION
        and marker.get("architecture") == json.loads(json.dumps(ARCHITECTURE))
        and marker.get("seed") == seed
        and marker.get("data_rows") == SAMPLE_ROWS
        and marker.get("pretraining", {}).get("steps") == pretrain_steps
    )


def ensure_tiny_model(
    out_dir: Path | None = None, *, seed: int = 0, force: bool = False, pretrain_steps: int | None = None
) -> Path:
    """Returns the tiny model's directory, building it first if it is missing or out of date.

    Args:
        out_dir: Model directory; default ``ftune_home()/models/tiny-llama``.
        seed: Build seed; an existing model built with another seed (or an older build format)
            is rebuilt.
        force: Rebuild even if an up-to-date model is there.
        pretrain_steps: Pretraining steps; None for the built-in default.

    Returns:
        The model directory, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileExistsError: If ``out_dir`` is a non-empty directory that is not a tiny-model build
            (it is never overwritten, since it may hold the user's files).
    """
    steps = PRETRAIN["steps"] if pretrain_steps is None else pretrain_steps
    final = Path(out_dir) if out_dir is not None else ftune_home() / "models" / "tiny-llama"
    if not force and _tiny_model_is_current(final, seed, steps):
        return final
    if final.is_dir() and any(final.iterdir()) and not (final / MARKER_FILE).exists():
        raise FileExistsError(
            f"{final} exists and is not a tiny-model build (no {MARKER_FILE}); "
            "delete it or choose another directory."
        )
    publish_dir(
        lambda tmp: build_tiny_model(tmp, seed=seed, pretrain_steps=steps),
        final,
        is_current=lambda path: not force and _tiny_model_is_current(path, seed, steps),
    )
    return final


def _write_if_changed(final: Path, content: bytes) -> Path:
    """Writes ``content`` to ``final`` atomically unless the file already holds exactly these bytes."""
    try:
        if final.read_bytes() == content:
            return final
    except FileNotFoundError:
        pass
    return write_bytes_atomic(final, content)  # concurrent writers write identical bytes


def ensure_sample_dataset() -> Path:
    """Returns ``ftune_home()/data/sample/train.jsonl``, writing it if missing or out of date.

    The file is regenerated in memory (milliseconds) and compared, so a cache written by an
    older generator is replaced rather than silently reused.

    Returns:
        Path of the JSON Lines file of the sample instruction dataset.
    """
    content = jsonl_text(generate_rows(SAMPLE_ROWS, seed=SAMPLE_SEED)).encode("utf-8")
    return _write_if_changed(ftune_home() / "data" / "sample" / "train.jsonl", content)


def ensure_sample_heldout() -> Path:
    """Returns ``ftune_home()/data/sample/heldout.jsonl``: questions about facts the training file never asks."""
    content = jsonl_text(heldout_rows()).encode("utf-8")
    return _write_if_changed(ftune_home() / "data" / "sample" / "heldout.jsonl", content)


BUILTINS: dict[str, Callable[[], Path]] = {
    TINY_LLAMA: ensure_tiny_model,
    SAMPLE_INSTRUCTIONS: ensure_sample_dataset,
    SAMPLE_HELDOUT: ensure_sample_heldout,
}
"""Built-in name -> function that ensures the asset exists and returns its path."""


def resolve_builtin(name: str) -> str:
    """Maps a ``builtin:`` name to the local path of the asset, building it if needed.

    Args:
        name: A model or dataset reference from a config, e.g. ``builtin:tiny-llama``, a hub id or
            a path.

    Returns:
        The ensured local path for a known built-in name; any string not starting with
        ``builtin:`` unchanged.

    Raises:
        ValueError: For an unknown ``builtin:`` name; the message lists the known ones.
    """
    if not name.startswith("builtin:"):
        return name
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in {name!r}; known built-ins: {', '.join(sorted(BUILTINS))}")
    return str(BUILTINS[name]())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m ftune.builtin_assets [--out DIR] [--seed S] [--force]``.

    Also writes the sample dataset under FTUNE_HOME, so one command prepares both built-ins.
    """
    parser = argparse.ArgumentParser(prog=prog("python -m ftune.builtin_assets"),
                                     description="Builds the built-in tiny Llama model and the sample dataset.")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default {ftune_home() / 'models' / 'tiny-llama'})",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (default 0)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help=f"pretraining steps (default {PRETRAIN['steps']})"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the directory already holds the model"
    )
    args = parser.parse_args(argv)
    try:
        path = ensure_tiny_model(args.out, seed=args.seed, force=args.force, pretrain_steps=args.pretrain_steps)
    except FileExistsError as e:
        raise UserError(str(e)) from e
    marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    print(
        f"tiny model in {path}: {marker['num_parameters']:,} parameters, "
        f"vocab {marker['vocab_size']}, seed {marker['seed']}"
    )
    print(f"sample dataset in {ensure_sample_dataset()}")


if __name__ == "__main__":
    main()
