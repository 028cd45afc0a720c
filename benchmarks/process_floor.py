"""The memory floor of a trainer process on the CPU: peak RSS after importing torch, transformers and peft, and after
building one random policy and reward model of an architecture (what `compare_trl.py` gives both trainers).

    uv run python benchmarks/process_floor.py small

Prints one line. Run it in a fresh process: the peak RSS of a process includes its parent's at the fork.
"""

import resource
import sys
import tempfile
from pathlib import Path

import peft  # noqa: F401  (imported for its memory, as a trainer does)
import torch  # noqa: F401
import transformers  # noqa: F401


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "small"
    imports = peak_gib()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ppo_lm.bench import build_model_dirs

    with tempfile.TemporaryDirectory() as directory:
        build_model_dirs(arch, Path(directory))
    print(f"{arch}: peak RSS {imports:.2f} GiB after the imports, {peak_gib():.2f} GiB after building its policy and "
          "reward model")


if __name__ == "__main__":
    main()
