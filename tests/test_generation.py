"""generation.py: the response mask that ends at the stop token."""

import torch

from ppo_lm.generation import mask_after_stop


def test_mask_after_stop_keeps_the_stop_token_and_nothing_after():
    responses = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(mask_after_stop(responses, stop_token_id=9), expected)
