"""benchmarks/compare_trl.py: its commands, settings, failures, summaries and table (no models, no TRL, no runs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_trl", ROOT / "benchmarks" / "compare_trl.py")
compare_trl = importlib.util.module_from_spec(_spec)
sys.modules["compare_trl"] = compare_trl
_spec.loader.exec_module(compare_trl)

BATCHING_OR_PRECISION = ("--micro_batch_size", "--micro_batch_tokens", "--dtype", "--gradient_checkpointing",
                         "--bf16", "--mixed_precision")


def dry_run(capsys, *extra: str) -> list[dict]:
    compare_trl.main(["--trl_python", "TRLPY", "--ours_python", "OURPY", "--dry_run", *extra])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def option(command: list[str], name: str) -> str:
    """The last value given to `name` (argparse's rule)."""
    return command[len(command) - 1 - command[::-1].index(name) + 1]


def test_dry_run_lists_every_regime_mode_and_setting(capsys):
    lines = dry_run(capsys, "--regimes", "small_vocab:tldr,small:32", "--modes", "full,lora",
                    "--ours_settings", "mb1024=--micro_batch_tokens 1024")
    keys = [(line["regime"], line["mode"], line["setting"]) for line in lines]
    expected = [(regime, mode, setting) for regime in ("small_vocab:tldr", "small:32") for mode in ("full", "lora")
                for setting in ("default", "mb1024", "whole", "accum")]
    assert keys == expected
    for line in lines:
        command = line["command"]
        arch, prompts = line["regime"].split(":")
        lora = line["mode"] == "lora"
        if line["trainer"] == "ppo-lm":
            assert command[:4] == ["OURPY", "-m", "ppo_lm", "bench"]
            assert option(command, "--model_name") == f"DIR/{arch}/policy"
            assert option(command, "--reward_model_name") == f"DIR/{arch}/reward"
            assert option(command, "--use_lora") == str(lora)
        else:
            assert command[:2] == ["TRLPY", "benchmarks/trl_reference.py"]
            assert option(command, "--policy") == f"DIR/{arch}/policy"
            assert option(command, "--lora") == str(int(lora))
            assert option(command, "--bf16") == "0"
        assert option(command, "--prompt_lengths") == prompts
        assert option(command, "--batch_size") == "32"
        if line["setting"] == "default":  # the user's defaults: no batching or precision flag at all
            assert not [arg for arg in command if arg.split("=")[0] in BATCHING_OR_PRECISION]
        if line["setting"] == "mb1024":
            assert command[-2:] == ["--micro_batch_tokens", "1024"]
        if line["setting"] == "whole":
            assert option(command, "--micro_batch_size") == "32"
        if line["setting"] == "accum":
            assert option(command, "--micro_batch_size") == str(compare_trl.TRL_PPO_MICRO_BATCH)


def test_dry_run_old_command_is_one_regime_and_bf16_reaches_every_setting(capsys):
    lines = dry_run(capsys, "--arch", "tiny", "--prompt_lengths", "48", "--modes", "lora", "--bf16", "1",
                    "--trl_micro_batch_size", "8", "--trl_settings", "bf16whole=--micro_batch_size 32")
    assert [(line["regime"], line["setting"]) for line in lines] == [
        ("tiny:48", "default"), ("tiny:48", "whole"), ("tiny:48", "accum"), ("tiny:48", "bf16whole")]
    commands = {line["setting"]: line["command"] for line in lines}
    assert option(commands["default"], "--dtype") == "bfloat16"
    assert all(option(commands[name], "--bf16") == "1" for name in ("whole", "accum", "bf16whole"))
    assert option(commands["accum"], "--micro_batch_size") == "8"
    assert option(commands["bf16whole"], "--micro_batch_size") == "32"  # appended after accum's, so it wins


def test_whole_batch_micro_batch_drops_the_duplicate_accum_setting(capsys):
    lines = dry_run(capsys, "--modes", "full", "--trl_micro_batch_size", "32", "--ours_micro_batch_size", "4")
    assert [line["setting"] for line in lines] == ["default", "mb4", "whole"]
    assert lines[1]["command"][-2:] == ["--micro_batch_size", "4"]


def test_skip_patterns(capsys):
    lines = dry_run(capsys, "--regimes", "small_vocab:tldr,small:tldr", "--skip", "small:tldr/*/whole,*/lora/accum")
    skipped = {(line["regime"], line["mode"], line["setting"]) for line in lines if line.get("skipped")}
    assert skipped == {("small:tldr", "full", "whole"), ("small:tldr", "lora", "whole"),
                       ("small_vocab:tldr", "lora", "accum"), ("small:tldr", "lora", "accum")}
    assert all("command" not in line for line in lines if line.get("skipped"))
    assert compare_trl.parse_skip("whole") == [("*", "*", "whole")]
    with pytest.raises(ValueError):
        compare_trl.parse_skip("small:tldr/whole")
    with pytest.raises(SystemExit):  # a typo in a setting's name is an error, not a silent no-op
        compare_trl.parse_arguments(["--trl_python", "x", "--skip", "wholee"])


def test_settings_parser():
    assert compare_trl.parse_settings("mb1024=--micro_batch_tokens 1024; mb8=--micro_batch_size 8") == {
        "mb1024": ["--micro_batch_tokens", "1024"], "mb8": ["--micro_batch_size", "8"]}
    assert compare_trl.parse_settings("eq=--micro_batch_tokens=512") == {"eq": ["--micro_batch_tokens=512"]}
    assert compare_trl.parse_settings("q=--note 'a b'") == {"q": ["--note", "a b"]}
    assert compare_trl.parse_settings(None) == {}
    for bad in ("noequals", "=--x 1", "a=--x 1;a=--y 2", "default=--x 1", "a/b=--x 1", "empty="):
        with pytest.raises(ValueError):
            compare_trl.parse_settings(bad)
    assert compare_trl.parse_regimes("small_vocab:tldr, small:32") == [("small_vocab", "tldr"), ("small", "32")]
    for bad in ("small", "small:0", "small:long", ":32", "small:32,small:32"):
        with pytest.raises(ValueError):
            compare_trl.parse_regimes(bad)


def test_a_setting_s_leading_variables_become_its_environment(capsys):
    lines = dry_run(capsys, "--modes", "lora", "--ours_settings", "je=LD_PRELOAD=/lib/je.so MALLOC_CONF=a:1,b:2",
                    "--trl_settings", "jewhole=LD_PRELOAD=/lib/je.so --micro_batch_size 32 X=1")
    commands = {line["setting"]: line["command"] for line in lines}
    assert commands["je"][:5] == ["env", "LD_PRELOAD=/lib/je.so", "MALLOC_CONF=a:1,b:2", "OURPY", "-m"]
    assert commands["je"][3:] == commands["default"]  # nothing else changes
    assert commands["jewhole"][:3] == ["env", "LD_PRELOAD=/lib/je.so", "TRLPY"]
    assert commands["jewhole"][-3:] == ["--micro_batch_size", "32", "X=1"]  # only the leading words are variables
    assert option(commands["jewhole"], "--micro_batch_size") == "32"
    assert commands["default"][0] == "OURPY" and commands["whole"][0] == "TRLPY"
    assert compare_trl.split_environment(["--micro_batch_tokens=512"]) == ([], ["--micro_batch_tokens=512"])
    assert compare_trl.split_environment(["lower=1", "--x"]) == ([], ["lower=1", "--x"])


def fake_result(step: float, memory: float) -> str:
    return json.dumps({"median_step_s": step, "peak_memory_gib": memory}) + "\n"


def test_failed_run_is_recorded_and_not_rerun(monkeypatch, capsys, tmp_path):
    calls: list[tuple[str, str]] = []
    builds: list[str] = []

    def fake_process(command):
        trainer = "trl" if "benchmarks/trl_reference.py" in command else "ppo-lm"
        micro = command[command.index("--micro_batch_size") + 1] if "--micro_batch_size" in command else None
        calls.append((trainer, micro))
        if trainer == "trl" and micro == "32":  # TRL's whole batch: killed by the kernel
            return subprocess.CompletedProcess(command, -9, "", "")
        step = 2.0 if trainer == "ppo-lm" else 3.0
        return subprocess.CompletedProcess(command, 0, "log line\n" + fake_result(step, 1.5), "")

    def fake_build(python, arch, directory):
        builds.append(arch)
        return f"/m/{arch}/policy", f"/m/{arch}/reward"

    monkeypatch.setattr(compare_trl, "run_process", fake_process)
    monkeypatch.setattr(compare_trl, "build_dirs", fake_build)
    out = tmp_path / "runs.jsonl"
    summaries = compare_trl.main(["--trl_python", "TRLPY", "--regimes", "tiny:tldr,tiny:16", "--modes", "full",
                                  "--rounds", "3", "--out", str(out)])
    assert builds == ["tiny"]  # once per architecture
    per_regime = [("ppo-lm", None), ("trl", "32"), ("trl", "4"), ("ppo-lm", None), ("trl", "4"), ("ppo-lm", None),
                  ("trl", "4")]
    assert calls == per_regime * 2  # whole batch: round 0 only
    records = [json.loads(line) for line in out.read_text().splitlines()]
    runs = [r for r in records if "summary" not in r]
    failed = [r for r in runs if "failed" in r]
    assert [(r["setting"], r["round"], r["failed"]) for r in failed] == [
        ("whole", 0, "out of memory (killed, signal 9)")] * 2
    assert {(r["regime"], r["trainer"]) for r in runs} == {("tiny:tldr", "ppo-lm"), ("tiny:tldr", "trl"),
                                                            ("tiny:16", "ppo-lm"), ("tiny:16", "trl")}
    assert len(summaries) == 2 and summaries == [r for r in records if "summary" in r]
    summary = summaries[0]
    assert summary["settings"]["whole"] == {"trainer": "trl", "failed": "out of memory (killed, signal 9)"}
    assert summary["settings"]["accum"]["runs"] == 3
    assert summary["trl_best"] == "accum"
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| tiny:16 | full |")


def test_failure_reasons():
    assert compare_trl.failure_reason(-9, "") == "out of memory (killed, signal 9)"
    assert compare_trl.failure_reason(137, "") == "out of memory (killed, signal 9)"
    assert compare_trl.failure_reason(1, "x\ntorch.OutOfMemoryError: CUDA out of memory\n").startswith("out of memory")
    assert compare_trl.failure_reason(2, "Traceback\nValueError: bad\n") == "exit status 2: ValueError: bad"
    assert compare_trl.failure_reason(-15, "") == "killed by signal 15"


def outcome(**runs) -> object:
    """An Outcome from {setting: [(step, memory), ...] or 'failure reason'}."""
    result = compare_trl.Outcome()
    for name, value in runs.items():
        if isinstance(value, str):
            result.results[name] = []
            result.failed[name] = value
        else:
            result.results[name] = [{"median_step_s": s, "peak_memory_gib": m} for s, m in value]
    return result


SETTINGS = [compare_trl.Setting("default", "ppo-lm"), compare_trl.Setting("mb8", "ppo-lm", ("--micro_batch_size", "8")),
            compare_trl.Setting("whole", "trl", trl_micro_batch_size=32),
            compare_trl.Setting("accum", "trl", trl_micro_batch_size=4),
            compare_trl.Setting("bf16", "trl", ("--bf16", "1"), 4)]


def test_summary_picks_trl_fastest_non_failed_setting_and_ratios():
    runs = outcome(default=[(2.0, 3.0), (4.0, 3.0), (3.0, 3.0)], mb8=[(2.5, 2.0), (2.5, 2.0)],
                   whole="out of memory (killed, signal 9)", accum=[(6.0, 4.0), (6.0, 4.0)], bf16=[(5.0, 8.0)])
    summary = compare_trl.summarise(("small", "tldr"), "full", SETTINGS, runs)
    assert summary["settings"]["default"] == {"trainer": "ppo-lm", "step_s": 3.0, "peak_gib": 3.0, "runs": 3}
    assert summary["ppo_lm_best"] == "mb8"
    assert summary["trl_best"] == "bf16"  # the fastest TRL setting that did not fail
    assert summary["time_ratio_default"] == pytest.approx(0.6)
    assert summary["memory_ratio_default"] == pytest.approx(0.375)
    assert summary["time_ratio_best"] == pytest.approx(0.5)
    assert summary["memory_ratio_best"] == pytest.approx(0.25)


def test_summary_leaves_out_a_setting_that_failed_in_a_later_round():
    runs = outcome(default=[(3.0, 3.0)], accum=[(6.0, 4.0)], whole=[(1.0, 9.0)])
    runs.failed["whole"] = "out of memory (killed, signal 9)"  # ran once, then failed
    summary = compare_trl.summarise(("small", "tldr"), "lora", SETTINGS[:1] + SETTINGS[2:4], runs)
    assert summary["trl_best"] == "accum"
    assert summary["time_ratio_default"] == pytest.approx(0.5)


def test_summary_without_any_trl_run_has_no_ratios():
    runs = outcome(default=[(3.0, 3.0)], whole="out of memory (killed, signal 9)")
    summary = compare_trl.summarise(("small", "tldr"), "lora", SETTINGS[:1] + SETTINGS[2:3], runs,
                                    skipped=[SETTINGS[3]])
    assert summary["trl_best"] is None and summary["time_ratio_default"] is None
    assert summary["settings"]["accum"] == {"trainer": "trl", "skipped": True}


def test_markdown_table_has_one_row_per_regime_and_mode():
    summaries = []
    for regime in (("small_vocab", "tldr"), ("small", "32")):
        for mode in ("full", "lora"):
            runs = outcome(default=[(2.0, 3.0)], mb8=[(1.0, 2.0)], whole="out of memory (killed, signal 9)",
                           accum=[(4.0, 6.0)], bf16=[(8.0, 1.0)])
            summaries.append(compare_trl.summarise(regime, mode, SETTINGS, runs))
    table = compare_trl.markdown_table(summaries).splitlines()
    assert len(table) == 2 + 4
    assert table[0].count("|") == table[1].count("|") == 10
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [(row[0], row[1]) for row in rows] == [("small_vocab:tldr", "full"), ("small_vocab:tldr", "lora"),
                                                  ("small:32", "full"), ("small:32", "lora")]
    assert rows[0][2:] == ["2.00 s, 3.00 GiB", "`mb8` 1.00 s, 2.00 GiB", "failed: out of memory (killed, signal 9)",
                           "4.00 s, 6.00 GiB", "`accum` 4.00 s, 6.00 GiB", "**0.50**", "**0.50**"]


def test_grpo_keeps_its_old_commands(capsys):
    compare_trl.main(["--trainer", "grpo", "--trl_python", "TRLPY", "--ours_python", "OURPY", "--modes", "lora",
                      "--dry_run", "--ours_micro_batch_size", "8"])
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["mode"] == "lora"
    assert option(line["ppo-lm"], "--dtype") == "float32" and option(line["ppo-lm"], "--micro_batch_size") == "8"
    assert line["trl"][:2] == ["TRLPY", "benchmarks/trl_grpo_reference.py"]
    with pytest.raises(SystemExit):
        compare_trl.parse_arguments(["--trainer", "grpo", "--trl_python", "x", "--regimes", "small:32"])
