"""Notes in the input embeddings: the model side of Taking Notes on the Fly (TNF; Wu et al. 2021,
"Taking Notes on the Fly Helps Language Pre-Training", ICLR 2021, arXiv:2008.01466).

TNF feeds a rare word's tokens the weighted average of their embedding and the word's note:

    input_i = (1 - lambda) * embedding_i + lambda * Note(w)      for the tokens i of w

(the paper averages with token + position embedding; here the note enters at the token
embedding, so absolute position and segment embeddings are added unscaled; with relative
positions, as in the demo recipes, the two are the same). The note is a constant (no gradient
flows into the dictionary); the embedding still gets (1 - lambda) of its gradient.

`notes_in_input` does it with a forward hook on the word embedding, for the forwards run inside
the `with`: the backbone's forward and every head stay as they are, and a fine-tuned or saved
model never sees a note.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def notes_in_input(word_embedding: nn.Embedding, positions: Tensor, notes: Tensor,
                   weight: float) -> Iterator[None]:
    """Inside the `with`, the word embedding's output at flat `positions` (T,) of its (B, L)
    input becomes (1 - weight) * embedding + weight * notes (T, hidden)."""

    def add_notes(module, args, output: Tensor) -> Tensor:
        if positions.numel() == 0:
            return output
        flat = output.reshape(-1, output.shape[-1])  # (B * L, hidden)
        mixed = (1.0 - weight) * flat[positions] + weight * notes.to(flat.dtype)
        return flat.index_copy(0, positions, mixed).view_as(output)

    handle = word_embedding.register_forward_hook(add_notes)
    try:
        yield
    finally:
        handle.remove()
