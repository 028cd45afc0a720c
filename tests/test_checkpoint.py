"""checkpoint.py: which checkpoint a resume takes (one cut short is skipped; a foreign or broken directory is a clear
error) and how many are kept."""

import logging

import pytest
from conftest import read_metrics

from ppo_lm.checkpoint import CheckpointError, find_checkpoint
from ppo_lm.cli import main


@pytest.mark.slow
def test_an_interrupted_checkpoint_is_skipped_on_resume(run_files, caplog):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 0
    # Simulate a crash while checkpoint-4 was being written: a weights file cut short.
    weights = run_dir / "checkpoint-4" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run_dir).name == "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "resuming from checkpoint-2" in caplog.text
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--resume"]) == 0
    assert [m["step"] for m in read_metrics(run_dir) if "reward_mean" in m] == [1, 2, 3, 4]


def test_resume_from_a_foreign_or_broken_directory_is_a_clear_error(run_files, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointError, match="No checkpoint in"):
        find_checkpoint(foreign)
    broken = tmp_path / "checkpoint-7"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no such directory"):
        find_checkpoint(tmp_path / "missing")
    assert main(["train", "--config", run_files["config"], "--resume", str(foreign)]) == 2
    assert f"No checkpoint in {foreign}" in capsys.readouterr().err  # the directory named, not another error


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    from ppo_lm.checkpoint import list_checkpoints, open_checkpoint, seal_checkpoint

    for step in (1, 2, 3):
        (open_checkpoint(tmp_path, step) / "weights.bin").write_bytes(b"x" * 10)
        seal_checkpoint(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary directory is left behind
