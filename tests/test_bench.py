"""`ppo-lm bench`: a timed PPO step on a tiny architecture, reported as one JSON line."""

import pytest

pytestmark = pytest.mark.slow


def test_bench_prints_one_json_line_with_every_figure(capsys):
    from ppo_lm.cli import main

    assert main(["bench", "--arch", "tiny", "--steps", "1", "--warmup", "0", "--batch_size", "4",
                 "--max_new_tokens", "2", "--ppo_epochs", "1", "--prompt_lengths", "8", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = __import__("json").loads(lines[0])
    for key in ("median_step_s", "stage_s", "generated_tokens_per_s", "tokens_per_s", "peak_memory_gib",
                "step_tflop", "floor_s", "time_over_floor"):
        assert key in result, key
    assert set(result["stage_s"]) == {"generate", "logprobs", "reward", "values", "update"}
    assert result["median_step_s"] > 0 and result["step_tflop"] > 0 and result["time_over_floor"] > 0
