"""Checkpoints that resume exactly, written atomically, read without unpickling anything.

A checkpoint is a directory `checkpoint-<step>` in the run directory. It is written under a hidden temporary
name and renamed into place only once complete; its manifest, written last, lists every file with its size and
SHA-256 checksum. A directory whose manifest is missing or whose files do not match it (missing, another size, one
flipped byte) is never taken for a good checkpoint: resuming falls back to the newest good one and says which file
was damaged, and `ppo-lm verify` checks a checkpoint or a whole run directory.

State that is not weights (optimizer moments, RNG states, data position, scheduler) is split into tensors, saved
with safetensors, and a JSON skeleton that says where each tensor goes: loading runs no pickled code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ppo_lm.distributed import shard_like

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
FORMAT = "ppo-lm-checkpoint"
MANIFEST_VERSION = 2
"""1: each file's size; 2: its size and SHA-256 (a version-1 checkpoint is still read, its sizes checked)."""
_CHUNK = 1 << 24  # bytes read at a time while hashing: 16 MiB
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A directory given to resume from is not a usable ppo-lm checkpoint or run directory."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (no space left, no permission, a read-only filesystem)."""


def write_failure(run_dir: Path, step: int, error: OSError) -> str:
    """The one-line message of a checkpoint of `step` that could not be written into `run_dir`."""
    where = getattr(error, "filename", None) or partial_checkpoint(run_dir, step)
    reason = error.strerror or str(error)
    fix = {errno.ENOSPC: "free some space there (or set output_dir on a larger disk) and resume",
           errno.EDQUOT: "free some space within the quota (or set output_dir elsewhere) and resume",
           errno.EACCES: "make the directory writable (or set output_dir elsewhere) and resume",
           errno.EROFS: "the filesystem is read-only: set output_dir on a writable one and resume",
           }.get(error.errno, "fix the cause and resume")
    return (f"Could not write the checkpoint of step {step}: {reason} ({where}). The partial checkpoint was removed; "
            f"the earlier checkpoints in {run_dir} are intact. To go on: {fix} (`--resume`).")


# --- state as safetensors + JSON ------------------------------------------------------------------------------

def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, arrays, numbers) into a JSON skeleton and tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
            return {"__ndarray__": key, "dtype": str(value.dtype)}
        if isinstance(value, dict):
            return {"__dict__": [[k, visit(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [visit(v) for v in value]}
        if isinstance(value, list):
            return [visit(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"Cannot checkpoint a {type(value).__name__}: {value!r:.80}")

    return visit(state), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the state that `flatten_state` split."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy().astype(skeleton["dtype"])
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {key: unflatten_state(v, tensors) for key, v in skeleton["__dict__"]}
    return skeleton


def save_state(state: Any, directory: Path, name: str) -> None:
    """Write `state` as `<name>.json` (skeleton) and `<name>.safetensors` (tensors) in `directory`."""
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str) -> Any:
    """Read the state that `save_state` wrote."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return unflatten_state(json.loads((directory / f"{name}.json").read_text()), tensors)


def save_trained(named: dict[str, torch.Tensor], directory: Path, name: str = "trainable") -> None:
    """Write the trained tensors, by name, to `<name>.safetensors` in `directory`."""
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in named.items()},
              str(directory / f"{name}.safetensors"))


def load_trained(named: dict[str, torch.Tensor], directory: Path, name: str = "trainable") -> None:
    """Copy what `save_trained` wrote into the tensors of `named`, in place.

    Raises ValueError unless the file holds exactly these names, each with its tensor's shape.
    """
    saved = load_file(str(directory / f"{name}.safetensors"))
    if saved.keys() != named.keys():
        missing, extra = sorted(named.keys() - saved.keys()), sorted(saved.keys() - named.keys())
        raise ValueError(
            f"Checkpoint {directory} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}. "
            "Was it written with another model_name, use_lora or LoRA setting?"
        )
    with torch.no_grad():
        for key, tensor in named.items():
            if saved[key].shape != tensor.shape:
                raise ValueError(f"Checkpoint tensor {key} has shape {tuple(saved[key].shape)}, the model "
                                 f"{tuple(tensor.shape)}.")
            tensor.copy_(shard_like(saved[key], tensor))  # a sharded tensor takes its own shard


# --- random number generators ----------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """The states of python's, numpy's and torch's (CPU and CUDA) random generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators to a state taken by `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing, finding and verifying checkpoints -------------------------------------------------------------------

def checkpoint_step(path: Path) -> int | None:
    """The step in a `checkpoint-<step>` directory name, or None for any other name."""
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def partial_checkpoint(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before `seal_checkpoint` publishes it."""
    return Path(run_dir) / f".checkpoint-{step}.partial"


def open_checkpoint(run_dir: Path, step: int) -> Path:
    """Make an empty `partial_checkpoint` directory (a leftover of an interrupted save is removed) and return it."""
    partial = partial_checkpoint(run_dir, step)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def seal_checkpoint(run_dir: Path, step: int, keep: int = 0) -> Path:
    """Publish the filled `partial_checkpoint` of `step`: the manifest seals it, a rename makes it
    `checkpoint-<step>`. Keeps the newest `keep` checkpoints (0 keeps all), and removes the partial checkpoints of
    other steps: a save that a killed process left unfinished, which no one will finish. Returns the checkpoint's
    path."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    partial = partial_checkpoint(run_dir, step)
    files = {str(p.relative_to(partial)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(partial.rglob("*")) if p.is_file()}
    manifest = {"format": FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}
    with open(partial / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # the same step saved again (e.g. the end of a run that just saved): replace it
        shutil.rmtree(final)
    os.replace(partial, final)
    for stale in run_dir.glob(".checkpoint-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in chunks (a checkpoint file may be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete, undamaged checkpoint, or None when its manifest and files agree: every file the
    manifest lists is there, with its size and (version 2) its SHA-256."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (it was not finished, or is not a ppo-lm checkpoint)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {MANIFEST}: {error}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{MANIFEST} is not a ppo-lm checkpoint manifest"
    for name, expected in manifest.get("files", {}).items():
        expected = expected if isinstance(expected, dict) else {"size": expected}  # version 1: the size alone
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected.get('size')}"
        if "sha256" in expected and file_sha256(file) != expected["sha256"]:
            return f"{name} is damaged: its SHA-256 differs from the one the manifest recorded"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` directories in `run_dir`, oldest first (complete or not)."""
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint to resume from: `path` itself if it is a checkpoint, else the newest good one in it.

    Incomplete checkpoints are skipped with a warning that names them and says which one is used instead.
    Raises CheckpointError when `path` is missing, is a broken checkpoint, or holds no good checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Cannot resume from {path}: no such directory.")
    if (path / MANIFEST).exists() or checkpoint_step(path) is not None:
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"Cannot resume from {path}: it is not a complete, undamaged checkpoint "
                                  f"({problem}).")
        return path
    candidates = list_checkpoints(path)
    skipped = []
    for candidate in reversed(candidates):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if skipped:
                logger.warning("Skipping incomplete or damaged checkpoint(s) %s; resuming from %s.",
                               "; ".join(skipped), candidate.name)
            return candidate
        skipped.append(f"{candidate.name} ({problem})")
    if skipped:
        raise CheckpointError(f"No complete, undamaged checkpoint in {path}: {'; '.join(skipped)}.")
    raise CheckpointError(
        f"No checkpoint in {path}: resume needs a run directory written by `ppo-lm train` (with "
        "checkpoint-<step> folders) or one checkpoint-<step> folder."
    )


def verify(path: Path) -> list[tuple[Path, str | None]]:
    """Check a checkpoint, or every checkpoint of a run directory (oldest first): each one's path and its problem
    (None when good; see `checkpoint_problem`). Raises CheckpointError when `path` is neither."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Cannot verify {path}: no such directory.")
    if (path / MANIFEST).exists() or checkpoint_step(path) is not None:
        return [(path, checkpoint_problem(path))]
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"No checkpoint in {path}: give a checkpoint-<step> folder or a run directory that "
                              "holds some.")
    return [(checkpoint, checkpoint_problem(checkpoint)) for checkpoint in checkpoints]
