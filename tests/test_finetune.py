"""finetune.py, what SFT and reward-model training share: prompt + completion batches and the completion mask."""

import logging

import torch

from ppo_lm.finetune import completion_mask, encode_completions


def test_completion_mask_marks_the_first_length_columns():
    assert completion_mask(torch.tensor([2, 0, 3]), 3).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]


def test_encode_completions_layout(qwen_tokenizer):
    prompts, completions = ["Hello there", "Hi"], [" one two three", " four"]
    batch = encode_completions(qwen_tokenizer, prompts, completions, max_length=64)
    eos = qwen_tokenizer.eos_token_id
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        real = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        prompt_ids = qwen_tokenizer(prompt)["input_ids"]
        completion_ids = qwen_tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        assert real == prompt_ids + completion_ids  # tokenised apart, EOS last, nothing else real
        assert batch.responses[row][batch.response_mask[row].bool()].tolist() == completion_ids
    assert batch.attention_mask[1, 0] == 0  # the shorter prompt is left-padded
    assert batch.response_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # the completions are right-padded


def test_encode_completions_cuts_long_completions_and_prompts(qwen_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        batch = encode_completions(qwen_tokenizer, ["word " * 20], [" a b c d e f"], max_length=10,
                                   max_completion_tokens=4)
    assert "cut and end without EOS" in caplog.text
    assert batch.response_mask.sum() == 4 and qwen_tokenizer.eos_token_id not in batch.responses[0].tolist()
    assert batch.attention_mask.sum() == 10  # the prompt kept its last 6 tokens
