"""The check every decoder family's KV cache must pass, shared by the UNILM and MASS tests."""

from __future__ import annotations

import numpy as np
import torch

from motian.serving.generate import Decoding, generate_ids


def assert_cache_equals_recomputation(model, prompts: list[list[int]], mask_id: int) -> None:
    """Greedy decoding with the KV cache gives the tokens (and logits within 1e-5) of
    recomputing everything each step; a prompt alone decodes as in the left-padded batch; beam
    search gives the same sequences and scores with and without the cache."""
    greedy = Decoding(max_new_tokens=6)
    cached = generate_ids(model, prompts, greedy, pad_id=0, keep_logits=True, mask_id=mask_id)
    full = generate_ids(model, prompts, Decoding(max_new_tokens=6, cache=False), pad_id=0,
                        keep_logits=True, mask_id=mask_id)
    assert cached.tokens == full.tokens and all(len(t) == 6 for t in cached.tokens)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for prompt, tokens in zip(prompts, cached.tokens):  # left padding changes nothing
        assert generate_ids(model, [prompt], greedy, 0, mask_id=mask_id).tokens == [tokens]
    beams = [generate_ids(model, prompts, Decoding(max_new_tokens=5, num_beams=3, cache=c), 0,
                          mask_id=mask_id) for c in (True, False)]
    assert beams[0].tokens == beams[1].tokens
    np.testing.assert_allclose(beams[0].scores, beams[1].scores, atol=1e-5)
