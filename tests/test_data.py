"""Data loading: every source format, every error, TL;DR prompts and their truncation, splits, the prompt stream, and
the SFT (prompt/completion) and preference (prompt/chosen/rejected) rows."""

from __future__ import annotations

import json
import logging

import datasets
import huggingface_hub.constants
import pytest
from rlhf_data import write_jsonl

from ppo_lm.data import (
    TLDR_TEMPLATE,
    DataError,
    PromptStream,
    check_conversation,
    completion_rows,
    format_tldr_prompt,
    load_completion_rows,
    load_preference_rows,
    load_prompts,
    load_rows,
    long_prompt_rows,
    needs_chat_template,
    prompts_from_rows,
    render_chat_prompts,
    require_columns,
    split_prompt_items,
    train_eval_split,
    warn_long_prompts,
)
from ppo_lm.data import preference_rows as to_preference_rows

PROMPTS = ["first prompt", "second prompt", "third prompt"]
LONG_POST = " ".join(f"Sentence {i} of a long post about my roommate and the dishes." for i in range(60))


# Loading each format -------------------------------------------------------------------------------------------


def test_load_rows_jsonl(tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS]))
    assert list(rows["prompt"]) == PROMPTS


_DATASETS_ON_DEMAND = """
import json, sys
import ppo_lm.bench, ppo_lm.ppo_trainer, ppo_lm.reward_trainer, ppo_lm.sft_trainer, ppo_lm.training
from ppo_lm.data import load_rows
loaded = lambda: [name for name in ("datasets", "pandas", "pyarrow") if name in sys.modules]
before = loaded()
rows = load_rows(sys.argv[1])
print(json.dumps([before, loaded(), list(rows["prompt"])]))
"""


@pytest.mark.slow
def test_datasets_loads_only_when_rows_are_read(tmp_path):
    """The trainers and the bench import `datasets` (and its pandas and pyarrow, about 80 MiB resident) only when a
    loader reads rows: a trainer given a list of prompts never holds them."""
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    result = subprocess.run([sys.executable, "-c", _DATASETS_ON_DEMAND, path], capture_output=True, text=True,
                            check=True)
    before, after, prompts = json.loads(result.stdout.strip().splitlines()[-1])
    assert before == [] and after == ["datasets", "pandas", "pyarrow"] and prompts == PROMPTS


def test_load_rows_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]))
    rows = load_rows(str(path))
    assert list(rows["prompt"]) == PROMPTS
    assert list(rows["id"]) == [0, 1, 2]


def test_load_rows_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,label\n" + "".join(f'"{p}, with a comma",{i}\n' for i, p in enumerate(PROMPTS)))
    rows = load_rows(str(path))
    assert list(rows["prompt"]) == [f"{p}, with a comma" for p in PROMPTS]


def test_load_rows_parquet(tmp_path):
    path = str(tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"prompt": PROMPTS}).to_parquet(path)
    assert list(load_rows(path)["prompt"]) == PROMPTS


def test_load_rows_file_slice_split(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    assert list(load_rows(path, split="train[:2]")["prompt"]) == PROMPTS[:2]


def test_load_rows_saved_dataset_dir(tmp_path):
    datasets.Dataset.from_dict({"prompt": PROMPTS}).save_to_disk(str(tmp_path / "saved"))
    assert list(load_rows(str(tmp_path / "saved"))["prompt"]) == PROMPTS
    with pytest.raises(DataError, match="only split is 'train'"):
        load_rows(str(tmp_path / "saved"), split="test")


def test_load_rows_saved_dataset_dict_dir(tmp_path):
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"prompt": PROMPTS}), test=datasets.Dataset.from_dict({"prompt": ["held"]})
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert list(load_rows(str(tmp_path / "saved"), split="test")["prompt"]) == ["held"]
    assert list(load_rows(str(tmp_path / "saved"))["prompt"]) == PROMPTS
    with pytest.raises(DataError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        load_rows(str(tmp_path / "saved"), split="validation")


# Loading errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.jsonl", "data/more/missing", "./missing"])
def test_load_rows_missing_path_names_it(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist") as info:
        load_rows(name)
    assert name.lstrip("./") in str(info.value)


def test_load_rows_unsupported_suffix_lists_supported(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a prompt\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"):
        load_rows(str(path))


def test_load_rows_plain_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        load_rows(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "text"), [("e.jsonl", ""), ("blank.jsonl", "\n\n"), ("h.csv", "prompt\n"), ("e.json", "[]")]
)
def test_load_rows_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(path))


def test_load_rows_file_has_only_train_split(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    with pytest.raises(DataError, match="only split is 'train'"):
        load_rows(path, split="test")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.jsonl", '{"prompt": "ok"}\n{not json\n',
     "bad.jsonl, line 2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "cut short"\n{"prompt": "ok"}\n',
     "bad.jsonl, line 3: invalid JSON: Expecting ',' delimiter (column 23)"),
    ("bad.jsonl", '{"prompt": "ok"}\n"a bare string"\n',
     'bad.jsonl, line 2: a string ("a bare string"), not an object'),
    ("bad.jsonl", '{"prompt": "ok"}\n[1, 2]\n', "bad.jsonl, line 2: a list ([1, 2]), not an object"),
    ("bad.json", '[{"prompt": "ok"},\n {"prompt" "no colon"}]',
     "bad.json, line 2: invalid JSON: Expecting ':' delimiter"),
    ("bad.json", '[{"prompt": "ok"}, 3]', "bad.json, item 1: a number (3), not an object"),
    ("bad.json", '{"prompt": "ok"}\n{"prompt": \n', "bad.json, line 2: invalid JSON: Expecting value"),
])
def test_a_broken_json_line_names_the_file_and_line(tmp_path, name, text, message):
    """The json builder's own error names neither the line nor the fault; load_rows finds both."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="Fix or remove it") as error:
        load_rows(str(path))
    assert message in str(error.value)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json", "bad.csv"])
def test_invalid_utf8_names_the_file_and_line(tmp_path, name):
    """pyarrow reads such bytes without complaint and fails only when the row is read: checked up front instead."""
    path = tmp_path / name
    first = b"prompt\n" if name.endswith(".csv") else b'{"prompt": "fine"}\n'
    bad = b"caf\xe9 au lait\n" if name.endswith(".csv") else b'{"prompt": "caf\xe9 au lait"}\n'
    path.write_bytes(first + first.replace(b"prompt", b"okay") * (not name.endswith(".csv")) + bad)
    line = 2 if name.endswith(".csv") else 3
    with pytest.raises(DataError, match=rf"bad\.\w+, line {line}: not valid UTF-8 \(byte 0xe9 at column \d+: invalid "
                                        r"continuation byte\)\. Save the file as UTF-8"):
        load_rows(str(path))


def test_a_malformed_csv_names_the_parser_s_reason(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,label\nfine,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"Could not read .*bad\.csv as csv \(ParserError: .*Expected 2 fields in "
                                        r"line 3, saw 3\)"):
        load_rows(str(path))


def test_load_rows_hub_failure_is_wrapped(tmp_path, monkeypatch):
    # Offline mode makes the hub call fail at once instead of retrying for half a minute without network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="from the Hugging Face Hub.*local file") as info:
        load_rows("ppo-lm-tests/no-such-dataset")
    assert "'ppo-lm-tests/no-such-dataset'" in str(info.value)
    assert info.value.__cause__ is not None


def test_require_columns_names_missing_and_present():
    rows = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    require_columns(rows, ["question"], source="x")  # Present: no error.
    with pytest.raises(DataError) as info:
        require_columns(rows, ["prompt", "chosen", "answer"], source="prefs.jsonl")
    message = str(info.value)
    assert "['prompt', 'chosen']" in message
    assert "['question', 'answer']" in message
    assert "prefs.jsonl" in message


# Prompts from rows ---------------------------------------------------------------------------------------------


def test_prompts_from_rows_plain_column():
    rows = datasets.Dataset.from_dict({"text": PROMPTS, "other": [1, 2, 3]})
    assert prompts_from_rows(rows, prompt_field="text") == PROMPTS


def test_prompts_from_rows_missing_prompt_field():
    rows = datasets.Dataset.from_dict({"text": PROMPTS})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['prompt'\]; its columns are \['text'\]"):
        prompts_from_rows(rows)


@pytest.mark.parametrize(("values", "shown"), [
    (["fine", "ok", None], "row 2: prompt is missing or null"),
    (["fine", "", "ok"], "row 1: prompt is ''"),
    (["fine", " \n\t", "ok"], "row 1: prompt is ' \\n\\t'"),
    ([3, 7], "row 0: prompt is 3"),
    ([{"text": "a dict"}, {"text": "b"}], "row 0: prompt is {'text': 'a dict'}"),
])
def test_prompts_from_rows_rejects_a_prompt_without_text(values, shown):
    rows = datasets.Dataset.from_dict({"prompt": values})
    with pytest.raises(DataError, match="every prompt must be a string with some text") as error:
        prompts_from_rows(rows, source="p.jsonl (split 'train')")
    assert str(error.value).startswith(f"p.jsonl (split 'train'), {shown}; ")


def test_plain_prompts_are_not_truncated(qwen_tokenizer):
    long_prompt = "word " * 200
    rows = datasets.Dataset.from_dict({"prompt": [long_prompt]})
    assert prompts_from_rows(rows, tokenizer=qwen_tokenizer, max_prompt_length=16) == [long_prompt]


def no_tokenizer():
    raise AssertionError("the tokenizer was loaded, though no text could be too long")


def test_long_prompt_rows_counts_tokens_only_where_bytes_could_overflow(qwen_tokenizer):
    long = "word " * 50
    tokens = len(qwen_tokenizer(long)["input_ids"])
    assert long_prompt_rows(["short", "also short"], 20, no_tokenizer) == []
    assert long_prompt_rows(["short", long, "x"], 20, lambda: qwen_tokenizer) == [(1, tokens, 20)]
    assert long_prompt_rows([long], tokens, lambda: qwen_tokenizer) == []  # exactly full: kept whole


def test_long_prompt_rows_of_sft_and_reward_rows_leave_room_for_the_longest_completion(qwen_tokenizer):
    prompt, completion = "word " * 10, " x" * 30
    prompt_tokens, completion_tokens = (len(qwen_tokenizer(text)["input_ids"]) for text in (prompt, completion))
    context = prompt_tokens + completion_tokens  # one short: the EOS after the completion does not fit
    rows = long_prompt_rows([prompt, "hi"], context, lambda: qwen_tokenizer, [[" ok", completion], [" ok", " no"]])
    assert rows == [(0, prompt_tokens, prompt_tokens - 1)]
    assert long_prompt_rows([prompt], context + 1, lambda: qwen_tokenizer, [[completion]]) == []
    # A completion cut to max_completion_tokens leaves the prompt its room.
    assert long_prompt_rows([prompt, "hi"], context, lambda: qwen_tokenizer, [[completion], [" no"]], 5) == []


def test_warn_long_prompts_names_the_file_and_first_row(qwen_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        rows = warn_long_prompts(["fine", "word " * 50, "fine", "word " * 40], 20, lambda: qwen_tokenizer,
                                 "p.jsonl (split 'train')",
                                 "20 tokens (the model's context of 30 less max_new_tokens=10)")
    assert rows == [1, 3]
    assert ("p.jsonl (split 'train'): 2 of 4 prompt(s) do not fit in 20 tokens (the model's context of 30 less "
            "max_new_tokens=10) and will keep only their last tokens (first: row 1, 51 tokens for a room of 20)"
            ) in caplog.text


# TL;DR prompts -------------------------------------------------------------------------------------------------


def test_format_tldr_prompt_exact():
    prompt = format_tldr_prompt("relationships", "My roommate", "He never washes up.")
    assert prompt == "SUBREDDIT: r/relationships\nTITLE: My roommate\nPOST: He never washes up.\nTL;DR:"
    assert prompt == TLDR_TEMPLATE.format(subreddit="relationships", title="My roommate", post="He never washes up.")


def test_format_tldr_prompt_leaves_short_post_untouched(qwen_tokenizer):
    full = format_tldr_prompt("AskReddit", "A title", "A short post.")
    assert format_tldr_prompt("AskReddit", "A title", "A short post.", qwen_tokenizer, 512) == full


@pytest.mark.parametrize("max_prompt_length", [40, 97, 200])
def test_format_tldr_prompt_truncates_post_only(qwen_tokenizer, max_prompt_length):
    title = "My roommate and the dishes"
    prompt = format_tldr_prompt("relationships", title, LONG_POST, qwen_tokenizer, max_prompt_length)
    assert len(qwen_tokenizer(prompt)["input_ids"]) <= max_prompt_length
    header = "SUBREDDIT: r/relationships\nTITLE: My roommate and the dishes\nPOST: "
    assert prompt.startswith(header)
    assert prompt.endswith("\nTL;DR:")
    post = prompt[len(header) : -len("\nTL;DR:")]
    assert post and LONG_POST.startswith(post)
    assert post == post.rstrip()
    # Cutting whole tokens: the kept post is within a couple of tokens of the budget, not far short of it.
    assert len(qwen_tokenizer(prompt)["input_ids"]) >= max_prompt_length - 3


def test_format_tldr_prompt_cut_never_splits_a_character(qwen_tokenizer):
    # Emoji and CJK characters span several byte-level tokens: a cut inside one must not leave U+FFFD behind.
    post = "我的室友从来不洗碗🙂🙃🦜" * 20
    for max_prompt_length in range(20, 40):
        prompt = format_tldr_prompt("r", "t", post, qwen_tokenizer, max_prompt_length)
        assert len(qwen_tokenizer(prompt)["input_ids"]) <= max_prompt_length
        assert "\ufffd" not in prompt
        assert post.startswith(prompt[len("SUBREDDIT: r/r\nTITLE: t\nPOST: ") : -len("\nTL;DR:")])


def test_format_tldr_prompt_header_too_long(qwen_tokenizer):
    with pytest.raises(DataError, match=r"max_prompt_length=8 tokens even with an empty post.*take \d+ tokens"):
        format_tldr_prompt("relationships", "A fairly long title that cannot fit", "post", qwen_tokenizer, 8)


def test_format_tldr_prompt_needs_tokenizer_for_length():
    with pytest.raises(ValueError, match="pass the tokenizer"):
        format_tldr_prompt("a", "b", "c", max_prompt_length=10)


def test_prompts_from_rows_tldr_columns(qwen_tokenizer):
    rows = datasets.Dataset.from_dict(
        {"subreddit": ["tifu", "pets"], "title": ["T1", "T2"], "post": ["Short.", LONG_POST], "summary": ["s", "s"]}
    )
    untruncated = prompts_from_rows(rows)
    assert untruncated == [format_tldr_prompt("tifu", "T1", "Short."), format_tldr_prompt("pets", "T2", LONG_POST)]
    cut = prompts_from_rows(rows, tokenizer=qwen_tokenizer, max_prompt_length=64)
    assert cut[0] == untruncated[0]
    assert cut[1] == format_tldr_prompt("pets", "T2", LONG_POST, qwen_tokenizer, 64) != untruncated[1]
    assert len(qwen_tokenizer(cut[1])["input_ids"]) <= 64


def test_prompts_from_rows_prefers_prompt_column_over_tldr_columns():
    rows = datasets.Dataset.from_dict({"subreddit": ["a"], "title": ["b"], "post": ["c"], "prompt": ["given"]})
    assert prompts_from_rows(rows) == ["given"]


def test_prompts_from_rows_tldr_null_post():
    rows = datasets.Dataset.from_dict({"subreddit": ["a", "a"], "title": ["b", "b"], "post": ["c", None]})
    with pytest.raises(DataError, match="row 1: post is None"):
        prompts_from_rows(rows)


# Train/eval split and load_prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction", "eval_size"), [(100, 0.1, 10), (10, 0.01, 1), (7, 0.5, 4), (5, 0.0, 0)])
def test_train_eval_split_sizes_and_order(n, fraction, eval_size):
    items = list(range(n))
    train, evaluation = train_eval_split(items, fraction, seed=3)
    assert len(evaluation) == eval_size
    assert sorted(train + evaluation) == items
    assert train == sorted(train) and evaluation == sorted(evaluation)


def test_train_eval_split_deterministic_and_seeded():
    items = [f"p{i}" for i in range(50)]
    assert train_eval_split(items, 0.2, seed=1) == train_eval_split(items, 0.2, seed=1)
    assert train_eval_split(items, 0.2, seed=1)[1] != train_eval_split(items, 0.2, seed=2)[1]


def test_train_eval_split_single_item_and_bad_fraction():
    assert train_eval_split(["only"], 0.5, seed=0) == (["only"], [])
    for fraction in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eval_fraction"):
            train_eval_split(["a", "b"], fraction, seed=0)


def test_load_prompts_eval_fraction(tmp_path):
    prompts = [f"prompt {i}" for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    train, evaluation = load_prompts(path, eval_fraction=0.25, seed=5)
    assert (train, evaluation) == train_eval_split(prompts, 0.25, seed=5)
    assert len(evaluation) == 5
    assert load_prompts(path) == (prompts, [])


def test_load_prompts_eval_split(tmp_path):
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"q": PROMPTS}), validation=datasets.Dataset.from_dict({"q": ["held out"]})
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(str(tmp_path / "saved"), eval_split="validation", prompt_field="q") == (PROMPTS, ["held out"])
    with pytest.raises(ValueError, match="not both"):
        load_prompts(str(tmp_path / "saved"), eval_split="validation", eval_fraction=0.5, prompt_field="q")


def test_load_prompts_names_the_file_in_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl \(split 'train'\) .*lacks column\(s\) \['prompt'\]; its columns"):
        load_prompts(path)


def test_load_prompts_no_train_left(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError, match="No train prompts are left"):
        load_prompts(path, eval_fraction=0.9)


def test_load_prompts_keeps_other_columns_in_dict_items(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "meta": {"level": i}} for i in range(4)]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    train, evaluation = load_prompts(path, prompt_field="question")
    assert evaluation == []
    assert train == [{"prompt": r["question"], "answer": r["answer"], "meta": r["meta"]} for r in rows]
    assert list(train[0]) == ["prompt", "answer", "meta"]
    # The seeded eval split holds the same dicts the train list would have had.
    train, evaluation = load_prompts(path, prompt_field="question", eval_fraction=0.25, seed=1)
    assert len(evaluation) == 1 and sorted(train + evaluation, key=lambda item: item["answer"]) == [
        {"prompt": r["question"], "answer": r["answer"], "meta": r["meta"]} for r in rows
    ]


def test_load_prompts_with_only_a_prompt_column_gives_strings(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": p} for p in PROMPTS])
    assert load_prompts(path, prompt_field="question") == (PROMPTS, [])
    assert all(type(prompt) is str for prompt in load_prompts(path, prompt_field="question")[0])


def test_load_prompts_tldr_rows_keep_their_other_columns_and_fit(tmp_path, qwen_tokenizer):
    rows = [{"subreddit": "tifu", "title": "T1", "post": "Short.", "summary": "s1", "id": "a"},
            {"subreddit": "pets", "title": "T2", "post": LONG_POST, "summary": "s2", "id": "b"}]
    path = write_jsonl(tmp_path / "tldr.jsonl", rows)
    train, _ = load_prompts(path, tokenizer=qwen_tokenizer, max_prompt_length=64)
    assert [sorted(item) for item in train] == [["id", "prompt", "summary"]] * 2
    assert train[0] == {"prompt": format_tldr_prompt("tifu", "T1", "Short."), "summary": "s1", "id": "a"}
    assert train[1]["prompt"] == format_tldr_prompt("pets", "T2", LONG_POST, qwen_tokenizer, 64)
    assert len(qwen_tokenizer(train[1]["prompt"])["input_ids"]) <= 64


def test_a_prompt_column_that_is_not_the_prompt_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "clash.jsonl", [{"question": "q", "prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"clash\.jsonl .*has a 'prompt' column, but prompts are read from "
                                        r"\['question'\] \(prompt_field='question'\).*set prompt_field='prompt'"):
        load_prompts(path, prompt_field="question")
    # Read from the "prompt" column itself, the same rows are fine.
    assert load_prompts(path)[0] == [{"prompt": "p", "question": "q", "answer": "a"}]


def test_split_prompt_items():
    items = [{"prompt": "p1", "answer": "1"}, {"answer": "2", "prompt": "p2"}]
    assert split_prompt_items(items) == (["p1", "p2"], {"answer": ["1", "2"]})
    assert split_prompt_items(["p1", "p2"]) == (["p1", "p2"], {})
    with pytest.raises(ValueError, match=r"Prompt item 1 has columns \[\] but item 0 has \['answer'\]"):
        split_prompt_items([items[0], "p2"])
    with pytest.raises(ValueError, match="without a 'prompt' key"):
        split_prompt_items([{"answer": "1"}])


# PromptStream --------------------------------------------------------------------------------------------------


def test_prompt_stream_epochs_are_seeded_permutations():
    prompts = [f"p{i}" for i in range(10)]
    stream = PromptStream(prompts, batch_size=4, seed=7)
    drawn = [p for _ in range(5) for p in stream.next_batch()]  # 20 prompts: exactly two epochs.
    assert sorted(drawn[:10]) == sorted(prompts) and sorted(drawn[10:]) == sorted(prompts)
    assert drawn[:10] != drawn[10:]  # Each epoch has its own order.
    again = PromptStream(prompts, batch_size=4, seed=7)
    assert [p for _ in range(5) for p in again.next_batch()] == drawn
    other = PromptStream(prompts, batch_size=4, seed=8)
    assert [p for _ in range(5) for p in other.next_batch()] != drawn
    assert stream.state_dict() == {"epoch": 2, "position": 0, "num_prompts": 10}


def test_prompt_stream_batch_larger_than_prompts():
    stream = PromptStream(["a", "b", "c"], batch_size=7, seed=0)
    batch = stream.next_batch()
    assert len(batch) == 7
    assert sorted(batch[:3]) == ["a", "b", "c"] and sorted(batch[3:6]) == ["a", "b", "c"]
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["position"] == 1


@pytest.mark.parametrize(("batch_size", "consumed"), [(3, 4), (4, 5), (1, 0)])
def test_prompt_stream_resume_is_exact(batch_size, consumed):
    prompts = [f"p{i}" for i in range(10)]
    original = PromptStream(prompts, batch_size=batch_size, seed=11)
    for _ in range(consumed):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # As a checkpoint would store it.
    assert all(type(value) is int for value in state.values())
    resumed = PromptStream(prompts, batch_size=batch_size, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == [original.next_batch() for _ in range(6)]


def test_prompt_stream_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream([], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptStream(["a"], batch_size=0, seed=0)
    stream = PromptStream(["a", "b"], batch_size=1, seed=0)
    with pytest.raises(ValueError, match="saved for 3 prompts"):
        stream.load_state_dict({"epoch": 0, "position": 0, "num_prompts": 3})
    with pytest.raises(ValueError, match="Invalid PromptStream state"):
        stream.load_state_dict({"epoch": 0, "position": 2})


# Completion rows (SFT) -----------------------------------------------------------------------------------------


def test_completion_rows_read_both_schemas(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "P: x\nTL;DR:", "completion": " short"}])
    assert load_completion_rows(plain) == ([{"prompt": "P: x\nTL;DR:", "completion": " short"}], [])
    tldr = write_jsonl(tmp_path / "tldr.jsonl", [{"subreddit": "cats", "title": "T", "post": "A post.",
                                                  "summary": "my cat sleeps"}])
    (row,), _ = load_completion_rows(tldr)
    assert row == {"prompt": "SUBREDDIT: r/cats\nTITLE: T\nPOST: A post.\nTL;DR:", "completion": " my cat sleeps"}
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"q": "Question?", "a": " Answer."}])
    assert load_completion_rows(renamed, prompt_field="q", completion_field="a")[0] == [
        {"prompt": "Question?", "completion": " Answer."}]


def test_empty_completions_are_skipped_with_a_warning(tmp_path, caplog):
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "a", "completion": " yes"}, {"prompt": "b", "completion": ""},
                                       {"prompt": "c", "completion": None}, {"prompt": "d", "completion": "  "}])
    with caplog.at_level(logging.WARNING):
        assert completion_rows(rows) == [{"prompt": "a", "completion": " yes"}]
    assert "skipping 3 of 4 row(s) with an empty completion (first: row 1)" in caplog.text
    with pytest.raises(DataError, match="every row's completion is empty"):
        completion_rows(rows.select([1, 2]))


def test_check_rows_sees_the_kept_rows_by_their_numbers_in_the_data():
    """A warning from `check_rows` (runs: rows too long for the model) names the row of the file, though rows before
    it were skipped."""
    seen = []
    sft = datasets.Dataset.from_list([{"prompt": "a", "completion": " x"}, {"prompt": "b", "completion": " "},
                                      {"prompt": "c", "completion": " y"}])
    completion_rows(sft, check_rows=lambda items, rows, source: seen.append((items, rows, source)), source="s.jsonl")
    assert seen == [([{"prompt": "a", "completion": " x"}, {"prompt": "c", "completion": " y"}], [0, 2], "s.jsonl")]
    seen.clear()
    comparisons = datasets.Dataset.from_list([
        {"info": {"id": "cnn", "post": None}, "summaries": ["a", "b"], "choice": 0},
        {"info": {"subreddit": "cats", "title": "T", "post": "P"}, "summaries": ["same", "same"], "choice": 0},
        {"info": {"subreddit": "cats", "title": "T", "post": "P"}, "summaries": ["good", "bad"], "choice": 0},
    ])
    to_preference_rows(comparisons, check_rows=lambda items, rows, source: seen.append(rows))
    assert seen == [[2]]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a"}, "lacks column 'completion'"),
    ({"text": "a", "completion": " b"}, "lacks column(s) ['prompt']"),
    ({"prompt": "a", "completion": 3}, "completion is 3, not a string"),
])
def test_bad_sft_rows_are_clear_errors(tmp_path, row, message):
    with pytest.raises(DataError) as error:
        load_completion_rows(write_jsonl(tmp_path / "bad.jsonl", [row]))
    assert message in str(error.value)


# Preference rows (reward models) -------------------------------------------------------------------------------


def test_the_openai_comparison_schema(tmp_path, caplog):
    rows = [
        {"info": {"subreddit": "cats", "title": "T", "post": "A post."},
         "summaries": [{"text": "first", "policy": "a"}, {"text": "second", "policy": "b"}], "choice": 1},
        {"info": {"subreddit": "dogs", "title": "U", "post": "Another."}, "summaries": [{"text": "x"}, {"text": "y"}],
         "choice": 0},
        {"info": {"id": "cnn", "article": "News.", "post": None}, "summaries": [{"text": "a"}, {"text": "b"}],
         "choice": 0},
    ]
    with caplog.at_level(logging.WARNING):
        train, _ = load_preference_rows(write_jsonl(tmp_path / "comparisons.jsonl", rows))
    assert train == [
        {"prompt": "SUBREDDIT: r/cats\nTITLE: T\nPOST: A post.\nTL;DR:", "chosen": " second", "rejected": " first"},
        {"prompt": "SUBREDDIT: r/dogs\nTITLE: U\nPOST: Another.\nTL;DR:", "chosen": " x", "rejected": " y"},
    ]
    assert "no post text" in caplog.text
    flat = datasets.Dataset.from_list([{"prompt": "P", "summaries": ["one", " two"], "choice": 0}])
    assert to_preference_rows(flat) == [{"prompt": "P", "chosen": " one", "rejected": " two"}]


def test_chosen_equal_to_rejected_and_empty_pairs_are_skipped_with_a_warning(caplog):
    rows = datasets.Dataset.from_list([
        {"prompt": "a", "chosen": " good", "rejected": " bad"},
        {"prompt": "b", "chosen": " same", "rejected": " same "},
        {"prompt": "c", "chosen": "", "rejected": " bad"},
        {"prompt": "d", "chosen": " good", "rejected": None},
    ])
    with caplog.at_level(logging.WARNING):
        assert to_preference_rows(rows) == [{"prompt": "a", "chosen": " good", "rejected": " bad"}]
    assert "skipping 1 of 4 row(s) with chosen equal to rejected (no preference to learn) (first: row 1)" in caplog.text
    assert "skipping 2 of 4 row(s) with an empty chosen or rejected completion (first: row 2)" in caplog.text
    with pytest.raises(DataError, match="no usable preference pair is left"):
        to_preference_rows(rows.select([1]))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": " b"}, "lacks preference columns"),
    ({"chosen": " a", "rejected": " b"}, "lacks column(s) ['prompt']"),
    ({"prompt": "a", "summaries": ["x", "y"], "choice": 2}, "choice is 2; it must be 0 or 1"),
    ({"prompt": "a", "summaries": ["x"], "choice": 0}, "must be a list of two summaries"),
    ({"prompt": "a", "chosen": [1], "rejected": " b"}, "chosen is [1], not a string"),
])
def test_bad_preference_rows_are_clear_errors(tmp_path, row, message):
    with pytest.raises(DataError) as error:
        load_preference_rows(write_jsonl(tmp_path / "bad.jsonl", [row]))
    assert message in str(error.value)


# Conversational prompts ---------------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def chat_tokenizer(qwen_tokenizer):
    from conftest import CHATML_TEMPLATE

    tokenizer = qwen_tokenizer.__class__(tokenizer_object=qwen_tokenizer.backend_tokenizer,
                                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_a_column_of_messages_is_read_as_conversations(tmp_path):
    rows = [{"prompt": CONVERSATION, "answer": "4"}, {"prompt": [{"role": "user", "content": "Hi"}], "answer": "x"}]
    train, _ = load_prompts(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert train == [{"prompt": CONVERSATION, "answer": "4"}, {"prompt": [{"role": "user", "content": "Hi"}],
                                                                 "answer": "x"}]


def test_check_conversation_drops_keys_a_mixed_dataset_fills_with_none():
    messages = [{"role": "user", "content": "Hi", "name": None}]
    assert check_conversation(messages, "row 0") == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("messages, message", [
    ([], "empty list"),
    (["just text"], "message 0 is 'just text'"),
    ([{"role": "user"}], "dict with 'role' and 'content'"),
    ([{"role": "user", "content": "Hi"}, {"role": "narrator", "content": "Later"}],
     "message 1 has the role 'narrator'"),
    ([{"role": "user", "content": 42}], "message 0 (user) has content 42, not a string"),
    ([{"role": "user", "content": None}], "content None, not a string"),
])
def test_check_conversation_names_the_fault(messages, message):
    with pytest.raises(DataError, match="rows.jsonl, row 3: prompt") as error:
        check_conversation(messages, "rows.jsonl, row 3: prompt")
    assert message in str(error.value)


def test_a_bad_message_in_a_file_names_the_file_and_row(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "fine"}]}, {"prompt": [{"role": "robot", "content": "no"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl.*row 1: prompt, message 0 has the role 'robot'"):
        load_prompts(path)


def test_render_chat_prompts_puts_conversations_into_the_chat_template(qwen_tokenizer):
    tokenizer = chat_tokenizer(qwen_tokenizer)
    items = [{"prompt": CONVERSATION, "answer": "4"}, {"prompt": [{"role": "user", "content": "Hi"}], "answer": "x"}]
    rendered = render_chat_prompts(items, tokenizer, system_prompt="Think first.")
    # The first keeps its own system message; the second gets system_prompt's. Columns stay beside the text.
    assert rendered == [
        {"prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                   "<|im_start|>assistant\n", "answer": "4"},
        {"prompt": "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n", "answer": "x"},
    ]
    assert items[0]["prompt"] == CONVERSATION  # the input items are not changed


def test_plain_prompts_go_into_the_chat_template_only_when_asked(qwen_tokenizer):
    tokenizer = chat_tokenizer(qwen_tokenizer)
    assert render_chat_prompts(["Hi"], tokenizer) == ["Hi"]
    assert not needs_chat_template(["Hi", {"prompt": "Yo", "a": 1}])
    assert needs_chat_template(["Hi"], chat_template=True)
    assert needs_chat_template([{"prompt": CONVERSATION}])
    assert render_chat_prompts(["Hi"], tokenizer, chat_template=True) == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]


def test_a_tokenizer_without_a_chat_template_is_an_error(qwen_tokenizer):
    assert qwen_tokenizer.chat_template is None
    with pytest.raises(DataError, match="has no chat template"):
        render_chat_prompts([{"prompt": CONVERSATION}], qwen_tokenizer)


def test_dataset_config_reaches_the_hub_loader(monkeypatch):
    calls = []

    def fake_load_dataset(name, config_name=None, split=None):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, evaluation = load_prompts("openai/gsm8k", dataset_config="main", eval_split="test", prompt_field="question")
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert train == evaluation == [{"prompt": "q", "answer": "#### 1"}]
