"""UNILM's self-attention masks (Dong et al. 2019, "Unified Language Model Pre-training for
Natural Language Understanding and Generation", arXiv:1905.03197, Figure 1).

One bidirectional Transformer is trained as four language models by changing only which key
each query may see; `unilm_visibility` builds that (B, L, L) boolean visibility per row from a
mode id and, for seq2seq rows, the source length. It goes to the backbone as `attention_mask`
(the (B, L, L) form of `attention_mask_bias`), so SDPA reads it as an additive mask and nothing
else in the model changes. The seq2seq case is the prefix LM that `heads.prefix_lm_mask`
already builds (source tokens see the whole source, target tokens the source and their own
left context): bidirectional is a prefix of the whole row, left-to-right a prefix of length 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from motian.model.heads import prefix_lm_mask

# Mode ids, in the order of `objective.unilm_modes` and the loader's `unilm_mode` column.
MODES = ("bidirectional", "seq2seq", "left_to_right", "right_to_left")
BIDIRECTIONAL, SEQ2SEQ, LEFT_TO_RIGHT, RIGHT_TO_LEFT = range(4)


def unilm_visibility(modes: Tensor, source_lengths: Tensor, attention_mask: Tensor | None,
                     L: int) -> Tensor:
    """(B, L, L) bool, True where query i may see key j, for rows of modes `modes` (B,) (ids
    of MODES) and seq2seq source lengths `source_lengths` (B,) (read for seq2seq rows only).
    Padding keys (attention_mask 0) are never seen. Every mode lets a token see itself: a
    masked token is predicted from its own [MASK] input plus the context its mode allows."""
    prefix = torch.where(modes == BIDIRECTIONAL, L,
                         torch.where(modes == SEQ2SEQ, source_lengths, 0))  # (B,)
    visible = prefix_lm_mask(prefix, L, attention_mask)  # bi, seq2seq and left-to-right
    j = torch.arange(L, device=modes.device)
    right_to_left = (j[None, :] >= j[:, None])[None]  # (1, L, L): the future and itself
    if attention_mask is not None:
        right_to_left = right_to_left & attention_mask.bool()[:, None, :]
    return torch.where((modes == RIGHT_TO_LEFT)[:, None, None], right_to_left, visible)
