"""checkpoint.py: which checkpoint a resume takes (one cut short is skipped; a foreign or broken directory is a clear
error) and how many are kept."""

import hashlib
import json
import logging

import pytest
from conftest import read_metrics

from ppo_lm.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    find_checkpoint,
    open_checkpoint,
    seal_checkpoint,
    verify,
)
from ppo_lm.cli import main


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_and_the_run_resumes_from_the_previous_good_one(run_files, caplog, capsys):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 0
    assert main(["verify", str(run_dir)]) == 0
    # One byte flipped in the newest checkpoint's weights (a damaged disk or network copy): same size, other bytes.
    weights = run_dir / "checkpoint-4" / "trainable.safetensors"
    straight = weights.read_bytes()
    damaged = bytearray(straight)
    damaged[len(damaged) // 2] ^= 0x01
    weights.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["verify", str(run_dir)]) == 1
    out, err = capsys.readouterr()
    assert "checkpoint-2: good" in out and "checkpoint-4: BAD: trainable.safetensors is damaged" in out
    assert "--resume would use checkpoint-2" in err
    assert main(["verify", str(run_dir / "checkpoint-4")]) == 1
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run_dir).name == "checkpoint-2"
    assert "checkpoint-4 (trainable.safetensors is damaged" in caplog.text
    assert "resuming from checkpoint-2" in caplog.text
    with pytest.raises(CheckpointError, match="trainable.safetensors is damaged"):
        find_checkpoint(run_dir / "checkpoint-4")  # named directly: refused, never loaded
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--resume"]) == 0
    assert [m["step"] for m in read_metrics(run_dir) if "reward_mean" in m] == [1, 2, 3, 4]
    assert weights.read_bytes() == straight  # steps 3 and 4 again, from checkpoint-2: the straight run's weights


def test_the_manifest_holds_each_files_size_and_checksum(tmp_path):
    (open_checkpoint(tmp_path, 1) / "weights.bin").write_bytes(b"abcdef" * 1000)
    checkpoint = seal_checkpoint(tmp_path, 1)
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    assert manifest["version"] == 2
    assert manifest["files"]["weights.bin"] == {"size": 6000, "sha256": hashlib.sha256(b"abcdef" * 1000).hexdigest()}
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "weights.bin").write_bytes(b"abcdeF" + b"abcdef" * 999)
    assert checkpoint_problem(checkpoint) == ("weights.bin is damaged: its SHA-256 differs from the one the manifest "
                                              "recorded")
    (checkpoint / "weights.bin").write_bytes(b"abc")
    assert checkpoint_problem(checkpoint) == "weights.bin has 3 bytes, the manifest says 6000"
    (checkpoint / "weights.bin").unlink()
    assert checkpoint_problem(checkpoint) == "weights.bin is missing"
    assert verify(tmp_path) == [(checkpoint, "weights.bin is missing")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="No checkpoint in"):
        verify(tmp_path / "empty")


def test_a_version_1_manifest_is_still_read(tmp_path):
    """Checkpoints written before checksums (sizes only) still resume; their sizes are still checked."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "weights.bin").write_bytes(b"x" * 10)
    (checkpoint / "checkpoint.json").write_text(json.dumps(
        {"format": "ppo-lm-checkpoint", "version": 1, "step": 3, "files": {"weights.bin": 10}}))
    assert checkpoint_problem(checkpoint) is None and find_checkpoint(tmp_path) == checkpoint
    (checkpoint / "weights.bin").write_bytes(b"x" * 9)
    assert checkpoint_problem(checkpoint) == "weights.bin has 9 bytes, the manifest says 10"


def test_resume_from_a_foreign_or_broken_directory_is_a_clear_error(run_files, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointError, match="No checkpoint in"):
        find_checkpoint(foreign)
    broken = tmp_path / "checkpoint-7"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="not a complete, undamaged checkpoint"):
        find_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no such directory"):
        find_checkpoint(tmp_path / "missing")
    assert main(["train", "--config", run_files["config"], "--resume", str(foreign)]) == 2
    assert f"No checkpoint in {foreign}" in capsys.readouterr().err  # the directory named, not another error


def test_only_the_newest_checkpoints_are_kept_and_a_killed_save_is_cleared(tmp_path):
    from ppo_lm.checkpoint import list_checkpoints

    (open_checkpoint(tmp_path, 7) / "weights.bin").write_bytes(b"x")  # a save that a killed run never sealed
    for step in (1, 2, 3):
        (open_checkpoint(tmp_path, step) / "weights.bin").write_bytes(b"x" * 10)
        seal_checkpoint(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary directory is left behind


@pytest.mark.slow
def test_a_save_that_fails_for_lack_of_space_leaves_the_earlier_checkpoints_and_no_partial_one(
        run_files, monkeypatch, capsys):
    import errno

    import ppo_lm.checkpoint

    real_save_file = ppo_lm.checkpoint.save_file

    def disk_full_at_step_4(tensors, filename, *args, **kwargs):
        if ".checkpoint-4.partial" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ppo_lm.checkpoint, "save_file", disk_full_at_step_4)
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: Could not write the checkpoint of step 4: No space left on device (" in err
    assert ".checkpoint-4.partial" in err and "earlier checkpoints in" in err and "free some space" in err
    assert not list(run_dir.glob(".checkpoint-*")) and not (run_dir / "checkpoint-4").exists()
    assert verify(run_dir) == [(run_dir / "checkpoint-2", None)]
    monkeypatch.setattr(ppo_lm.checkpoint, "save_file", real_save_file)  # space freed: the run resumes and ends
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--resume"]) == 0
    assert [m["step"] for m in read_metrics(run_dir) if "reward_mean" in m] == [1, 2, 3, 4]
