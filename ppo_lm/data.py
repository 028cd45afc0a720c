"""Data loading shared by every kind of run: rows from a local file, a saved directory or the hub, then items.

PPO runs read prompts with `load_items` and `prompt_items_from_rows` (`load_prompts` puts the two together: strings,
or dicts that also carry the row's other columns for reward functions to read), SFT runs `load_completion_rows`
(`{"prompt", "completion"}` dicts) and reward-model runs `load_preference_rows` (`{"prompt", "chosen", "rejected"}`
dicts); each feeds its train items through a `PromptStream` (endless, seeded, resumable batches of any items).

Prompts come either from a column (`prompt` by default) of text or of conversations (lists of chat messages,
TRL's conversational format, put into the tokenizer's chat template by `render_chat_prompts`), or, for Reddit TL;DR
rows with `subreddit`, `title` and
`post` columns, from `TLDR_TEMPLATE`; a TL;DR post that is too long for `max_prompt_length` tokens loses the end of
its body, never the header or the `TL;DR:` cue the policy answers. A TL;DR summary becomes a completion with one
leading space (the prompt ends in `TL;DR:`), as in the N+ implementation details of RLHF.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Local file suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
"""The file types that hold text, which `load_rows` checks is UTF-8 before they are read."""
TLDR_COLUMNS = ("subreddit", "title", "post")
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
SUMMARY_COLUMN = "summary"
"""Column of a TL;DR row's reference summary (the OpenAI TL;DR SFT release): the completion of an SFT row."""
PREFERENCE_COLUMNS = ("chosen", "rejected")
COMPARISON_COLUMNS = ("summaries", "choice")
"""The OpenAI human-feedback comparisons: two summaries (dicts with `text`, or strings), the preferred one's index."""
PROMPT_KEY = "prompt"
"""Key of the prompt text in a prompt item that is a dict; the row's other columns sit beside it."""
PromptItem = str | dict[str, Any]
"""One PPO prompt: its text, or `{"prompt": text, <other column>: value, ...}` when the rows have other columns."""
# BPE merges where the cut post meets "\nTL;DR:" can shift the count by a token or two; a few retries settle it.
_MAX_FIT_TRIES = 4


class DataError(ValueError):
    """The data given to a run cannot be used: missing, empty, in an unsupported format, or lacking a column."""


def _supported_suffixes() -> str:
    return ", ".join(FILE_BUILDERS)


def _looks_like_path(dataset: str) -> bool:
    """True for names that are meant as local paths rather than hub ids (`name` or `namespace/name`)."""
    if dataset.lower().endswith(tuple(FILE_BUILDERS)) or dataset.startswith((".", "~", os.sep)):
        return True
    separators = dataset.count(os.sep) + (dataset.count(os.altsep) if os.altsep else 0)
    # A hub id has at most one "/"; on Linux os.sep is "/" too, so one separator alone cannot mean a path.
    return separators > 1


def _load_file(path: str, split: str) -> datasets.Dataset:
    """Read one local data file with the builder its suffix names; split "train" is the whole file."""
    suffix = next((s for s in FILE_BUILDERS if path.lower().endswith(s)), None)
    if suffix is None:
        raise DataError(
            f"Cannot read {path}: unsupported file type {os.path.splitext(path)[1] or '(no suffix)'!r}. "
            f"Supported: {_supported_suffixes()}, or a directory saved with Dataset.save_to_disk."
        )
    if split.split("[")[0] != "train":
        raise DataError(
            f"{path} is a single file, so its only split is 'train' (slices such as 'train[:1000]' also work); got "
            f"split {split!r}. Put other splits in their own files, or use a directory saved with "
            "DatasetDict.save_to_disk."
        )
    # An empty .jsonl makes the json builder raise a bare StopIteration: catch it before it gets there.
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty: it holds no rows.")
    if suffix in TEXT_SUFFIXES:
        _check_utf8(path)
    import datasets  # here, not at the top: see `_load_hub`

    try:
        with _quiet_json_builder():
            return datasets.load_dataset(FILE_BUILDERS[suffix], data_files=path, split=split)
    except Exception as error:
        # `datasets` reports a file with no rows (a header-only CSV, "[]", blank lines) this way.
        if "corresponds to no data" in str(error):
            raise DataError(f"{path} (split {split!r}) holds no rows.") from error
        # The json builder's own error names neither the line nor the fault: find them, only now that it failed.
        fault = _json_fault(path, suffix == ".jsonl") if FILE_BUILDERS[suffix] == "json" else None
        if fault is not None:
            raise DataError(f"{path}, {fault}. Fix or remove it.") from error
        root = _root_cause(error)
        raise DataError(
            f"Could not read {path} as {FILE_BUILDERS[suffix]} ({type(root).__name__}: {str(root).strip()}). Check "
            f"that the file is valid {suffix[1:]} with one record per row."
        ) from error


class _NoJsonFailureLine(logging.Filter):
    """Drops the json builder's own log line about a file it cannot parse: `_load_file` raises a better error (with
    the file's line number; the builder counts rows from 0 and skips blank lines, which reads as a contradiction)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load JSON from file")


@contextlib.contextmanager
def _quiet_json_builder() -> Iterator[None]:
    """While a file loads, without the json builder's line about a parse failure (see `_NoJsonFailureLine`)."""
    builder_logger = logging.getLogger("datasets.packaged_modules.json.json")
    quiet = _NoJsonFailureLine()
    builder_logger.addFilter(quiet)
    try:
        yield
    finally:
        builder_logger.removeFilter(quiet)


def _check_utf8(path: str) -> None:
    """Raise DataError naming the first line of a text data file that is not valid UTF-8.

    pyarrow's readers accept such bytes and the row fails only when it is read, far from the file, so the whole
    file is checked here first (line by line: a loop over rows, cheap beside parsing them).
    """
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}, line {number}: not valid UTF-8 (byte 0x{line[error.start]:02x} at column "
                    f"{error.start + 1}: {error.reason}). Save the file as UTF-8, or fix that line."
                ) from None


def _json_fault(path: str, json_lines: bool) -> str | None:
    """Where and why a JSON-lines (`json_lines`) or JSON file cannot be read as rows ("line 3: invalid JSON: ..."),
    or None when no fault is found here (the json builder then failed for another reason)."""
    if not json_lines:
        with open(path, encoding="utf-8") as file:
            text = file.read()  # one JSON document: the json builder holds it whole too
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as error:
            # "Extra data" after a first complete value: JSON lines in a .json file; check them line by line below.
            if error.msg != "Extra data":
                return f"line {error.lineno}: invalid JSON: {error.msg} (column {error.colno})"
        else:
            rows = whole if isinstance(whole, list) else [whole]
            bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
            return None if bad is None else f"item {bad}: {_json_type(rows[bad])}, not an object of column: value pairs"
    with open(path, encoding="utf-8") as file:  # line by line: a large file is never held whole
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # so that a cut-off line's column is its end, not past it
            except json.JSONDecodeError as error:
                return f"line {number}: invalid JSON: {error.msg} (column {error.colno})"
            if not isinstance(row, dict):
                return f"line {number}: {_json_type(row)}, not an object of column: value pairs"
    return None


def _json_type(value: Any) -> str:
    """A JSON value as a message shows it: its kind in words and its start ('a list ([1, 2])')."""
    names = {str: "a string", int: "a number", float: "a number", bool: "true/false", list: "a list",
             type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} ({json.dumps(value)[:40]})"


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain (`datasets` wraps the reader's own, which says what was wrong)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _load_saved(path: str, split: str) -> datasets.Dataset:
    """Read a directory written by `Dataset.save_to_disk` (split "train" = all of it) or `DatasetDict.save_to_disk`."""
    import datasets  # here, not at the top: see `_load_hub`

    try:
        saved = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise DataError(
            f"{path} is a directory but not one written by Dataset.save_to_disk or DatasetDict.save_to_disk. Pass "
            f"such a directory or a data file ({_supported_suffixes()})."
        ) from error
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path} has no split {split!r}; its splits are {sorted(saved)}.")
        return saved[split]
    if split != "train":
        raise DataError(
            f"{path} holds a single Dataset, so its only split is 'train'; got split {split!r}. Save a DatasetDict "
            "to have more splits."
        )
    return saved


def _load_hub(name: str, split: str, config_name: str | None = None) -> datasets.Dataset:
    """Load a split of a hub dataset (of its configuration `config_name`, if given), turning any failure (no network,
    no such dataset, configuration or split) into DataError.

    `datasets` (with pyarrow and pandas: about 80 MiB of resident memory) is imported by the three loaders of rows
    only, so that a trainer given its prompts as a list never loads it."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as error:
        subset = f", configuration {config_name!r}" if config_name else ""
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:200]
        raise DataError(  # one line: what was asked, why it failed, what to do
            f"Could not load dataset {name!r} (split {split!r}{subset}) from the Hugging Face Hub "
            f"({type(error).__name__}: {reason}). No local file or directory of that name exists either. To use local "
            f"data, pass a path to a {_supported_suffixes()} file or to a directory saved with save_to_disk."
        ) from error


def load_rows(dataset: str, split: str = "train", config_name: str | None = None) -> datasets.Dataset:
    """Load the rows of one split of `dataset`.

    `dataset` is a local `.jsonl`, `.json`, `.csv` or `.parquet` file (split "train" is the whole file), a directory
    saved by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`, or else a hub dataset name (`config_name` picks
    its configuration, e.g. 'main' for openai/gsm8k; local data has none). Raises DataError for a local path that
    does not exist, an unsupported file type, an unknown split, no rows, or a hub load that fails.
    """
    path = os.path.expanduser(dataset)
    if os.path.isdir(path):
        rows = _load_saved(path, split)
    elif os.path.isfile(path):
        rows = _load_file(path, split)
    elif _looks_like_path(dataset):
        raise DataError(
            f"Local dataset path {path} does not exist. Check it (relative paths start from {os.getcwd()})."
        )
    else:
        rows = _load_hub(dataset, split, config_name)
    if len(rows) == 0:
        raise DataError(f"{dataset} (split {split!r}) holds no rows.")
    return rows


def require_columns(rows: datasets.Dataset, columns: Sequence[str], source: str) -> None:
    """Raise DataError naming each of `columns` that `rows` lacks, the columns it has, and where it came from."""
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise DataError(
            f"{source} lacks column(s) {missing}; its columns are {rows.column_names}. Rename the columns in the "
            "data, or choose the field to read (for prompts: prompt_field)."
        )


def _count_tokens(tokenizer: Any, text: str) -> int:
    # Special tokens counted as the trainer counts them when it encodes prompts (generation.encode_prompts).
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def format_tldr_prompt(
    subreddit: str, title: str, post: str, tokenizer: Any = None, max_prompt_length: int | None = None
) -> str:
    """Fill `TLDR_TEMPLATE`; with a tokenizer and `max_prompt_length` (tokens), cut the post's end until it fits.

    Only the POST body is shortened, by whole tokens from its end (trailing whitespace removed); the subreddit and
    title lines and the `TL;DR:` cue are always kept whole. Raises DataError when even an empty post does not fit,
    and ValueError when `max_prompt_length` is given without a tokenizer.
    """
    prompt = TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post=post)
    if max_prompt_length is None:
        return prompt
    if tokenizer is None:
        raise ValueError("max_prompt_length counts tokens: pass the tokenizer too.")
    if _count_tokens(tokenizer, prompt) <= max_prompt_length:
        return prompt
    header = TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post="")
    header_length = _count_tokens(tokenizer, header)
    if header_length > max_prompt_length:
        raise DataError(
            f"A TL;DR prompt for the post titled {title!r:.80} does not fit in max_prompt_length={max_prompt_length} "
            f"tokens even with an empty post: the subreddit, title and TL;DR lines alone take {header_length} tokens. "
            "Raise max_prompt_length or drop rows with such long titles."
        )
    post_ids = tokenizer(post, add_special_tokens=False)["input_ids"]
    keep = min(len(post_ids), max_prompt_length - header_length)
    for _ in range(_MAX_FIT_TRIES):
        # A cut inside a multi-byte character decodes to U+FFFD: drop it with the trailing whitespace.
        kept = tokenizer.decode(post_ids[:keep], clean_up_tokenization_spaces=False).rstrip().rstrip("\ufffd").rstrip()
        prompt = TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post=kept)
        excess = _count_tokens(tokenizer, prompt) - max_prompt_length
        if excess <= 0:
            return prompt
        keep = max(0, keep - excess)
    return header  # Known to fit; only reached if merges kept defeating the cuts above.


def _tldr_batch(batch: dict[str, list], indices: list[int], source: str) -> dict[str, list[str]]:
    """`Dataset.map` function: one untruncated TL;DR prompt per row."""
    for column in TLDR_COLUMNS:
        for index, value in zip(indices, batch[column], strict=True):
            if not isinstance(value, str):
                raise DataError(
                    f"{source}, row {index}: {column} is {value!r:.80}, not a string; every TL;DR row needs text there."
                )
    prompts = [
        TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post=post)
        for subreddit, title, post in zip(batch["subreddit"], batch["title"], batch["post"], strict=True)
    ]
    return {"prompt": prompts}


def _prompt_columns(columns: Sequence[str], prompt_field: str) -> tuple[str, ...]:
    """The columns a row's prompt is read from: TL;DR's subreddit/title/post when there is no `prompt_field` column
    but those three are there, else `prompt_field` alone (which may be missing: `prompts_from_rows` says so)."""
    if prompt_field not in columns and all(column in columns for column in TLDR_COLUMNS):
        return TLDR_COLUMNS
    return (prompt_field,)


def prompts_from_rows(
    rows: datasets.Dataset,
    prompt_field: str = "prompt",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    *,
    source: str = "The prompt rows",
) -> list[str]:
    """The prompts in `rows`: strings, or conversations (lists of chat messages, see `check_conversation`).

    Rows with `subreddit`, `title` and `post` columns but no `prompt_field` column become TL;DR prompts
    (`format_tldr_prompt`), their posts cut to fit `max_prompt_length` tokens when a tokenizer is given. Otherwise
    the `prompt_field` column is returned as it is: plain prompts are never cut here, since the trainer keeps the
    last tokens of a prompt that is too long and warns. A conversation is checked here and rendered later, with the
    tokenizer (`render_chat_prompts`). Raises DataError for a missing column, a malformed conversation, or a value
    that is neither (None, a number, a string of whitespace alone); `source` (where the rows came from) starts the
    message, and the row and column follow.
    """
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("max_prompt_length counts tokens: pass the tokenizer too.")
    columns = rows.column_names
    if _prompt_columns(columns, prompt_field) == TLDR_COLUMNS:
        formatted = rows.map(
            _tldr_batch, batched=True, with_indices=True, remove_columns=columns, keep_in_memory=True,
            fn_kwargs={"source": source}, desc="Formatting TL;DR prompts",
        )
        prompts = list(formatted["prompt"])
        if tokenizer is None or max_prompt_length is None:
            return prompts
        # One batched tokenizer call finds the few prompts that need their post cut.
        token_lists = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        too_long = [i for i, tokens in enumerate(token_lists) if len(tokens) > max_prompt_length]
        for i in too_long:
            row = rows[i]
            prompts[i] = format_tldr_prompt(*(row[column] for column in TLDR_COLUMNS), tokenizer, max_prompt_length)
        return prompts
    require_columns(rows, [prompt_field], source=f"{source} (read with prompt_field={prompt_field!r})")
    prompts = list(rows[prompt_field])
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list):
            prompts[i] = check_conversation(prompt, f"{source}, row {i}: {prompt_field}")
        elif not isinstance(prompt, str) or not prompt.strip():
            # A prompt of spaces alone would still encode to tokens and train on nothing the data meant.
            value = "missing or null" if prompt is None else f"{prompt!r:.80}"
            raise DataError(
                f"{source}, row {i}: {prompt_field} is {value}; every prompt must be a string with some text (not "
                "only whitespace) or a list of chat messages. Fix or drop that row."
            )
    return prompts


_TOKEN_MARGIN = 8
"""Tokens a tokenizer may add to a text beyond one per UTF-8 byte (BOS, EOS, SentencePiece's leading-space piece),
well rounded up: byte-level BPE and byte-fallback tokenizers never make more tokens than bytes otherwise."""


def long_prompt_rows(
    prompts: Sequence[str],
    room: int,
    tokenizer: Callable[[], Any],
    completions: Sequence[Sequence[str]] | None = None,
    max_completion_tokens: int | None = None,
) -> list[tuple[int, int, int]]:
    """`(row, prompt tokens, room for it)` of each of `prompts` longer than the room it gets, counted as the trainers
    encode them: `room` tokens, less (when `completions` is given: SFT and reward rows) the longest of the row's
    completions plus its EOS, cut to `max_completion_tokens` (as `finetune.encode_completions` cuts them).

    `tokenizer()` returns the tokenizer. It is called only for rows whose UTF-8 bytes (plus `_TOKEN_MARGIN`) could
    overflow, so a run whose texts are all short tokenises nothing here.
    """
    limit = room - 1 if max_completion_tokens is None else min(max_completion_tokens, room - 1)

    def completion_bound(row: int) -> int:
        if completions is None:
            return 0
        return min(max(len(text.encode("utf-8")) for text in completions[row]) + _TOKEN_MARGIN + 1, limit)

    candidates = [row for row, prompt in enumerate(prompts)
                  if len(prompt.encode("utf-8")) + _TOKEN_MARGIN + completion_bound(row) > room]
    if not candidates:
        return []
    encode = tokenizer()
    encoded = encode([prompts[row] for row in candidates], add_special_tokens=True)["input_ids"]
    prompt_tokens = [len(ids) for ids in encoded]
    rooms = [room] * len(candidates)
    if completions is not None:
        # One tokenizer call for every completion of every candidate row, then each row's longest.
        texts = [text for row in candidates for text in completions[row]]
        counts = [len(ids) for ids in encode(texts, add_special_tokens=False)["input_ids"]]
        start = 0
        for k, row in enumerate(candidates):
            longest = max(counts[start:start + len(completions[row])])
            start += len(completions[row])
            rooms[k] = room - min(longest + 1, limit)
    return [(row, tokens, row_room) for row, tokens, row_room in zip(candidates, prompt_tokens, rooms, strict=True)
            if tokens > row_room]


def warn_long_prompts(
    prompts: Sequence[str],
    room: int,
    tokenizer: Callable[[], Any],
    source: str,
    why: str,
    completions: Sequence[Sequence[str]] | None = None,
    max_completion_tokens: int | None = None,
    rows: Sequence[int] | None = None,
) -> list[int]:
    """Warn once about the rows of `prompts` longer than their room (see `long_prompt_rows`), which the trainers cut
    to their last tokens (the end of a prompt is what the response continues): how many, the first row, its length
    and room. `why` says where the room comes from; `source` (where the rows came from) starts the message; `rows`
    numbers the prompts as the data does (default: 0, 1, ...). Returns the numbers of the rows that do not fit."""
    long = long_prompt_rows(prompts, room, tokenizer, completions, max_completion_tokens)
    numbers = range(len(prompts)) if rows is None else rows
    if long:
        index, tokens, row_room = long[0]
        logger.warning("%s: %d of %d prompt(s) do not fit in %s and will keep only their last tokens (first: row %d, "
                       "%d tokens for a room of %d). Shorten them, or use a model with a longer context.",
                       source, len(long), len(prompts), why, numbers[index], tokens, row_room)
    return [numbers[index] for index, _, _ in long]


def prompt_items_from_rows(
    rows: datasets.Dataset,
    prompt_field: str = "prompt",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    *,
    source: str = "The prompt rows",
) -> list[PromptItem]:
    """The PPO prompt items in `rows`: the prompts of `prompts_from_rows`, with the rows' other columns when any.

    When `rows` has columns besides those the prompt is read from (`prompt_field`, or TL;DR's subreddit/title/post),
    each item is `{"prompt": text, <other column>: value, ...}` with every other column's value as the row holds it,
    so reward functions can read them (an answer to check, say); otherwise each item is the prompt string itself.
    Raises DataError as `prompts_from_rows` does, and when a column named "prompt" is not the one the prompt is read
    from (its values would be hidden behind the prompt text).
    """
    columns = rows.column_names
    read = _prompt_columns(columns, prompt_field)
    others = [column for column in columns if column not in read]
    # Only once the prompt's own columns exist; otherwise prompts_from_rows names the missing one, the real fault.
    if PROMPT_KEY in others and all(column in columns for column in read):
        raise DataError(
            f"{source} has a {PROMPT_KEY!r} column, but prompts are read from {list(read)} (prompt_field="
            f"{prompt_field!r}). Each prompt item keeps the text under {PROMPT_KEY!r} beside the row's other columns, "
            f"so that column would be lost: rename it in the data, or set prompt_field={PROMPT_KEY!r} to read prompts "
            "from it."
        )
    prompts = prompts_from_rows(rows, prompt_field, tokenizer, max_prompt_length, source=source)
    if not others:
        return prompts
    extras = rows.select_columns(others).to_list()
    return [{PROMPT_KEY: prompt, **extra} for prompt, extra in zip(prompts, extras, strict=True)]


# --- Conversational prompts -----------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant", "tool")
"""The roles a chat message may have (those chat templates know)."""


def check_conversation(messages: list, where: str) -> list[dict[str, str]]:
    """`messages` as a clean conversation: a non-empty list of `{"role", "content"}` dicts, the role one of
    `CHAT_ROLES` and the content a string. Keys other than those two are dropped (a dataset that mixes message
    shapes fills the missing keys with None). Raises DataError naming `where` and the message at fault."""
    if not messages:
        raise DataError(f"{where} is an empty list; a conversation needs at least one message. Fix or drop that row.")
    clean = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}, message {j} is {message!r:.80}; each chat message must be a dict with 'role' "
                            "and 'content'.")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise DataError(f"{where}, message {j} has the role {role!r}; the roles a chat template knows are "
                            f"{', '.join(CHAT_ROLES)}.")
        if not isinstance(content, str):
            raise DataError(f"{where}, message {j} ({role}) has content {content!r:.80}, not a string; a chat "
                            "message's content must be text.")
        clean.append({"role": role, "content": content})
    return clean


def _prompt_of(item: PromptItem) -> Any:
    return item[PROMPT_KEY] if isinstance(item, dict) else item


def needs_chat_template(items: Sequence[PromptItem], chat_template: bool = False) -> bool:
    """Whether `render_chat_prompts` has anything to do: `chat_template` is on, or some prompt is a conversation."""
    return chat_template or any(isinstance(_prompt_of(item), list) for item in items)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None = None) -> str:
    """The conversation as prompt text in the tokenizer's chat template, ending with the opening of the assistant's
    reply (`add_generation_prompt`), after a system message of `system_prompt` unless it starts with its own.
    Raises DataError when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"The prompts are chat messages, but the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')!r} "
            "has no chat template. Use an instruct (chat) model, or give plain-text prompts (and chat_template: "
            "false)."
        )
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_chat_prompts(
    items: Sequence[PromptItem], tokenizer: Any, system_prompt: str | None = None, chat_template: bool = False
) -> list[PromptItem]:
    """`items` with each conversation rendered as prompt text (`render_chat`); with `chat_template`, each plain-text
    prompt too, as the user message. Other plain-text prompts are kept as they are; a dict item keeps its columns."""
    rendered: list[PromptItem] = []
    for item in items:
        prompt = _prompt_of(item)
        if isinstance(prompt, str) and chat_template:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            prompt = render_chat(tokenizer, prompt, system_prompt)
        rendered.append({**item, PROMPT_KEY: prompt} if isinstance(item, dict) else prompt)
    return rendered


def split_prompt_items(items: Sequence[PromptItem]) -> tuple[list[str], dict[str, list]]:
    """A batch of prompt items as `(prompts, columns)`: the texts, and each other column's values in item order.

    Plain-string items give no columns. `columns` is what `rewards.call_reward_fn` takes (repeat each value as often
    as its prompt is sampled). Raises ValueError when the items do not all carry the same columns (for instance
    strings mixed with dicts), or a dict item has no "prompt".
    """
    prompts: list[str] = []
    columns: dict[str, list] = {}
    keys: list[str] | None = None
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if PROMPT_KEY not in item:
                raise ValueError(f"Prompt item {i} is a dict without a {PROMPT_KEY!r} key: {sorted(item)}.")
            item_keys = [key for key in item if key != PROMPT_KEY]
            prompts.append(item[PROMPT_KEY])
        else:
            item_keys = []
            prompts.append(item)
        if keys is None:
            keys = item_keys
            columns = {key: [] for key in keys}
        elif set(item_keys) != set(keys):
            raise ValueError(
                f"Prompt item {i} has columns {sorted(item_keys)} but item 0 has {sorted(keys)}; every item of a batch "
                "must carry the same columns."
            )
        for key in item_keys:
            columns[key].append(item[key])
    return prompts, columns


def train_eval_split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `eval_fraction` of `items`; both parts keep the original order.

    The eval part has `max(1, round(eval_fraction * len(items)))` items when `eval_fraction > 0` and there are at
    least two items, and none otherwise. Raises ValueError for a fraction outside [0, 1).
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    n = len(items)
    if eval_fraction == 0 or n < 2:
        return list(items), []
    held_out = set(random.Random(seed).sample(range(n), max(1, round(eval_fraction * n))))
    train = [item for i, item in enumerate(items) if i not in held_out]
    evaluation = [item for i, item in enumerate(items) if i in held_out]
    return train, evaluation


def load_prompts(
    dataset: str,
    split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float = 0.0,
    prompt_field: str = "prompt",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    seed: int = 0,
    dataset_config: str | None = None,
) -> tuple[list[PromptItem], list[PromptItem]]:
    """Train and eval prompts for a PPO run (`ppo-lm train` adds the chat template and checks to each split: see
    `runs.load_prompt_data`).

    Train prompts come from `split` of `dataset` (see `load_rows`, `prompt_items_from_rows`): strings, or dicts with
    the prompt under "prompt" and the row's other columns beside it when the rows have other columns. Eval prompts
    come from `eval_split` of the same dataset when given, else from a seeded `eval_fraction` of the train prompts
    (see `train_eval_split`); with neither, the eval list is empty. Raises DataError when no train prompt is left, and
    ValueError when both `eval_split` and `eval_fraction` are given.
    """
    return load_items(
        dataset, lambda rows, source: prompt_items_from_rows(rows, prompt_field, tokenizer, max_prompt_length,
                                                             source=source),
        split, eval_split, eval_fraction, seed, dataset_config, what="prompts",
    )


def load_items(
    dataset: str,
    convert: Callable[[datasets.Dataset, str], list],
    split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    dataset_config: str | None = None,
    what: str = "items",
) -> tuple[list, list]:
    """Train and eval items of any kind: `convert(rows, source)` turns the rows of a split into items.

    Train items come from `split`; eval items from `eval_split` when given (a split of `dataset`, or a path: a data
    file of its own), else from a seeded `eval_fraction` of the train items (see `train_eval_split`). Raises
    DataError when no train item is left, and ValueError when both `eval_split` and `eval_fraction` are given.
    `dataset_config` is the hub configuration of `dataset` (see `load_rows`); `what` names the items in messages.
    """
    if eval_split is not None and eval_fraction > 0:
        raise ValueError(
            f"Give eval_split ({eval_split!r}) or eval_fraction ({eval_fraction}), not both: each picks the eval "
            f"{what}."
        )
    train = convert(load_rows(dataset, split, dataset_config), f"{dataset} (split {split!r})")
    if eval_split is not None:
        # A path (a .jsonl/.json/.csv/.parquet file, or a saved directory given as ./dir or /dir) is its own dataset.
        if _looks_like_path(eval_split):
            eval_dataset, eval_split, eval_config = eval_split, "train", None
        else:
            eval_dataset, eval_config = dataset, dataset_config
        evaluation = convert(load_rows(eval_dataset, eval_split, eval_config), f"{eval_dataset} (split {eval_split!r})")
    else:
        train, evaluation = train_eval_split(train, eval_fraction, seed)
    if not train:
        raise DataError(
            f"No train {what} are left: {dataset} (split {split!r}) has {len(evaluation)} and eval_fraction="
            f"{eval_fraction} holds out all of them. Lower eval_fraction or add {what}."
        )
    return train, evaluation


# --- SFT and preference rows ----------------------------------------------------------------------------------

RowCheck = Callable[[list[dict[str, str]], list[int], str], object]
"""`check_rows(items, rows, source)`: sees the items of a split once they are built (rows that are skipped left out),
each one's row number in the data, and where they came from: runs warn there about rows too long for the model."""


def _text(value: Any, row: int, column: str, source: str) -> str:
    """A cell that must hold text: None reads as '' (an empty text), anything else but a string is a DataError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{source}, row {row}: {column} is {value!r:.80}, not a string. Fix or drop that row.")
    return value


def _with_leading_space(text: str) -> str:
    """A summary as the completion of a prompt that ends in 'TL;DR:': one space first (unless it has one)."""
    return text if not text or text[0].isspace() else " " + text


def _drop_rows(
    items: list[dict[str, str]], reasons: dict[str, list[int]], source: str, check_rows: RowCheck | None = None,
    rows: Sequence[int] | None = None,
) -> list[dict[str, str]]:
    """`items` without the rows listed under each reason, with one warning per reason: how many, why, which first.
    `rows` numbers the items as the data does (default: 0, 1, ...); `check_rows` sees the items that are kept."""
    numbers = list(range(len(items))) if rows is None else list(rows)
    for why, bad in reasons.items():
        if bad:
            logger.warning("%s: skipping %d of %d row(s) with %s (first: row %d).", source, len(bad), len(items), why,
                           numbers[bad[0]])
    dropped = {i for bad in reasons.values() for i in bad}
    kept = [i for i in range(len(items)) if i not in dropped]
    if check_rows is not None:
        check_rows([items[i] for i in kept], [numbers[i] for i in kept], source)
    return [items[i] for i in kept]


def _prompt_source_columns(
    rows: datasets.Dataset, prompt_field: str, source: str
) -> tuple[datasets.Dataset, list[int] | None]:
    """Rows whose prompt lives in an `info` dict (the OpenAI comparisons) get subreddit/title/post columns from it.

    Rows whose `info` has no text `post` (the CNN/DM articles of that release) are dropped with a warning. Any other
    rows are returned unchanged. Returns the rows and, when some were dropped, the numbers of those kept (else None).
    """
    columns = rows.column_names
    if prompt_field in columns or all(c in columns for c in TLDR_COLUMNS) or "info" not in columns:
        return rows, None
    infos = rows["info"]
    keep = [i for i, info in enumerate(infos) if isinstance(info, dict) and isinstance(info.get("post"), str)]
    if len(keep) < len(infos):
        first = next(i for i in range(len(infos)) if i not in set(keep))
        logger.warning("%s: skipping %d of %d row(s) whose info has no post text (not a TL;DR post; first: row %d).",
                       source, len(infos) - len(keep), len(infos), first)
    if not keep:
        raise DataError(f"{source}: no row's info holds a Reddit post (info.post); there is no TL;DR prompt to build.")
    numbers = keep if len(keep) < len(infos) else None
    rows = rows.select(keep)
    infos = [infos[i] for i in keep]
    for column in TLDR_COLUMNS:
        rows = rows.add_column(column, [info.get(column) or "" for info in infos])
    return rows, numbers


def completion_rows(
    rows: datasets.Dataset,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    *,
    source: str = "The SFT rows",
    check_rows: RowCheck | None = None,
) -> list[dict[str, str]]:
    """Prompt/completion pairs for SFT, as `{"prompt", "completion"}` dicts.

    Two schemas: a `prompt_field` column (or TL;DR subreddit/title/post columns, see `prompts_from_rows`) and a
    `completion_field` column, as in `trl-lib/tldr`; or TL;DR rows with a `summary` column (the OpenAI TL;DR
    release), whose summary becomes the completion with one leading space. Rows with an empty or missing completion
    are skipped with a warning (training on them would teach the model to stop at once); `check_rows` sees the rest
    (see `RowCheck`). Raises DataError for a missing column, a value that is not text, or when no row is left.
    """
    columns = rows.column_names
    if completion_field in columns:
        column, space = completion_field, False
    elif SUMMARY_COLUMN in columns and all(c in columns for c in TLDR_COLUMNS):
        column, space = SUMMARY_COLUMN, True
    else:
        raise DataError(
            f"{source} lacks column {completion_field!r}; its columns are {columns}. SFT rows need a prompt and a "
            f"completion column (set prompt_field and completion_field), or TL;DR subreddit/title/post columns and "
            f"a {SUMMARY_COLUMN!r} column."
        )
    prompts = prompts_from_rows(rows, prompt_field, tokenizer, max_prompt_length, source=source)
    completions = [_text(value, i, column, source) for i, value in enumerate(rows[column])]
    if space:
        completions = [_with_leading_space(text) for text in completions]
    items = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    items = _drop_rows(items, {"an empty completion": [i for i, c in enumerate(completions) if not c.strip()]}, source,
                       check_rows)
    if not items:
        raise DataError(f"{source}: every row's completion is empty; there is nothing to train on.")
    return items


def _comparison_pair(summaries: Any, choice: Any, row: int, source: str) -> tuple[str, str]:
    """(chosen, rejected) texts of one OpenAI comparison row: two summaries and the preferred one's index."""
    if not isinstance(summaries, (list, tuple)) or len(summaries) != 2:
        raise DataError(f"{source}, row {row}: summaries is {summaries!r:.80}; it must be a list of two summaries.")
    texts = [_text(s.get("text") if isinstance(s, dict) else s, row, "summaries", source) for s in summaries]
    if choice not in (0, 1) or isinstance(choice, bool):
        raise DataError(f"{source}, row {row}: choice is {choice!r}; it must be 0 or 1, the preferred summary's index.")
    return _with_leading_space(texts[choice]), _with_leading_space(texts[1 - choice])


def preference_rows(
    rows: datasets.Dataset,
    prompt_field: str = "prompt",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    *,
    source: str = "The preference rows",
    check_rows: RowCheck | None = None,
) -> list[dict[str, str]]:
    """Preference pairs for reward-model training, as `{"prompt", "chosen", "rejected"}` dicts.

    Two schemas: `chosen` and `rejected` text columns with a prompt (a `prompt_field` column or TL;DR columns), as in
    `trl-lib/tldr-preference`; or the OpenAI human-feedback comparisons: `summaries` (two dicts with `text`, or two
    strings) and `choice` (0 or 1), the prompt from TL;DR columns or from an `info` dict holding them. Summaries get
    one leading space. Pairs whose chosen and rejected texts are equal (no preference to learn) or where either is
    empty are skipped with a warning; `check_rows` sees the rest (see `RowCheck`). Raises DataError for a missing
    column, a malformed value, or no pair left.
    """
    rows, numbers = _prompt_source_columns(rows, prompt_field, source)
    columns = rows.column_names
    if all(c in columns for c in PREFERENCE_COLUMNS):
        pairs = [(_text(c, i, "chosen", source), _text(r, i, "rejected", source))
                 for i, (c, r) in enumerate(zip(rows["chosen"], rows["rejected"], strict=True))]
    elif all(c in columns for c in COMPARISON_COLUMNS):
        pairs = [_comparison_pair(s, c, i, source)
                 for i, (s, c) in enumerate(zip(rows["summaries"], rows["choice"], strict=True))]
    else:
        raise DataError(
            f"{source} lacks preference columns; its columns are {columns}. Give 'chosen' and 'rejected' columns "
            "(with a prompt), or 'summaries' (two texts) and 'choice' (the preferred one's index)."
        )
    prompts = prompts_from_rows(rows, prompt_field, tokenizer, max_prompt_length, source=source)
    items = [{"prompt": p, "chosen": c, "rejected": r} for p, (c, r) in zip(prompts, pairs, strict=True)]
    empty = [i for i, (c, r) in enumerate(pairs) if not c.strip() or not r.strip()]
    same = [i for i, (c, r) in enumerate(pairs) if c.strip() and c.strip() == r.strip()]
    items = _drop_rows(items, {"an empty chosen or rejected completion": empty,
                               "chosen equal to rejected (no preference to learn)": same}, source, check_rows, numbers)
    if not items:
        raise DataError(f"{source}: no usable preference pair is left (see the warnings above).")
    return items


def load_completion_rows(
    dataset: str,
    split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float = 0.0,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    seed: int = 0,
    dataset_config: str | None = None,
    check_rows: RowCheck | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval prompt/completion rows for an SFT run (see `completion_rows` and `load_items`)."""
    return load_items(
        dataset, lambda rows, source: completion_rows(rows, prompt_field, completion_field, tokenizer,
                                                      max_prompt_length, source=source, check_rows=check_rows),
        split, eval_split, eval_fraction, seed, dataset_config, what="rows",
    )


def load_preference_rows(
    dataset: str,
    split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float = 0.0,
    prompt_field: str = "prompt",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    seed: int = 0,
    dataset_config: str | None = None,
    check_rows: RowCheck | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval preference pairs for a reward-model run (see `preference_rows` and `load_items`)."""
    return load_items(
        dataset, lambda rows, source: preference_rows(rows, prompt_field, tokenizer, max_prompt_length, source=source,
                                                      check_rows=check_rows),
        split, eval_split, eval_fraction, seed, dataset_config, what="pairs",
    )


class PromptStream:
    """Endless batches of prompts (or any items): a fresh seeded shuffle each epoch, resumable from `state_dict()`.

    Epoch `e` visits the prompts in the order of a `random.Random(seed + e)` permutation; a batch that runs past
    the end of an epoch continues into the next, and `batch_size` may exceed the number of prompts.
    """

    def __init__(self, prompts: Sequence, batch_size: int, seed: int) -> None:
        if len(prompts) == 0:
            raise ValueError("PromptStream needs at least one prompt.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # Index into this epoch's permutation of the next prompt to yield; always < len(prompts).
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def _epoch_order(self) -> list[int]:
        # Rebuilt only when the epoch changes, so a batch costs O(batch_size) apart from one shuffle per epoch.
        if self._order_epoch != self.epoch:
            self._order = list(range(len(self.prompts)))
            random.Random(self.seed + self.epoch).shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> list:
        """The next `batch_size` prompts, crossing into the next epoch (and its new order) where needed."""
        batch = []
        for _ in range(self.batch_size):
            batch.append(self.prompts[self._epoch_order()[self.position]])
            self.position += 1
            if self.position == len(self.prompts):
                self.epoch += 1
                self.position = 0
        return batch

    def __iter__(self) -> Iterator[list[str]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: epoch, position, and the number of prompts (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`: the next batches are those the saved stream would have given.

        The stream must have been built with the same prompts, batch size and seed. Raises ValueError for a state
        that does not fit this stream's prompts.
        """
        num_prompts = state.get("num_prompts", len(self.prompts))
        if num_prompts != len(self.prompts):
            raise ValueError(
                f"This PromptStream state was saved for {num_prompts} prompts but the stream has {len(self.prompts)}; "
                "resume with the same prompts (same dataset, split, eval settings and seed)."
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.prompts):
            raise ValueError(f"Invalid PromptStream state {state}: need epoch >= 0 and 0 <= position < num_prompts.")
        self.epoch, self.position = epoch, position
