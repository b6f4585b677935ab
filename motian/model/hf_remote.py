"""Hugging Face wrappers around motian heads, for configurations BERT cannot express (Pre-LN,
relative positions, GEGLU, decoders).

This file is not imported by motian itself: `motian.model.hf.export_hf` concatenates config.py,
positions.py, transformer.py, heads.py and this file into the exported directory's
`modeling_motian.py`, which `transformers` loads with `trust_remote_code=True`. So the exported
model runs motian's own code, written once, and needs nothing but torch and transformers.
"""

from __future__ import annotations

import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from motian.model.config import ModelConfig
from motian.model.heads import HEADS
from motian.model.transformer import KVCache


class MotianConfig(PretrainedConfig):
    """`motian`: the ModelConfig as a dict; `head` / `head_kwargs`: which motian head to build."""

    model_type = "motian"

    def __init__(self, motian: dict | None = None, head: str = "MaskedLM",
                 head_kwargs: dict | None = None, **kwargs):
        self.motian = dict(motian or {})
        self.head = head
        self.head_kwargs = dict(head_kwargs or {})
        # read by generate() (beam search sizes its scores with it); the ModelConfig holds it
        self.vocab_size = self.motian.get("vocab_size")
        kwargs.setdefault("tie_word_embeddings", False)  # motian ties inside its own head
        super().__init__(**kwargs)


class MotianPreTrainedModel(PreTrainedModel):
    """Holds the motian head as `self.motian`; weights are saved under `motian.`."""

    config_class = MotianConfig
    base_model_prefix = "motian"

    def __init__(self, config: MotianConfig):
        super().__init__(config)
        self.motian = HEADS[config.head](ModelConfig.from_dict(config.motian), **config.head_kwargs)
        self.post_init()

    def _init_weights(self, module):
        pass  # motian initialised its own weights (BERT scheme); loading overwrites them anyway

    def get_input_embeddings(self):
        backbone = getattr(self.motian, "backbone", self.motian)
        return backbone.embeddings.word


class MotianModelForHF(MotianPreTrainedModel):
    """AutoModel: last hidden states (B, L, hidden)."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                **kwargs):
        h = self.motian(input_ids, attention_mask, token_type_ids, position_ids)
        return BaseModelOutput(last_hidden_state=h)


class MotianForMaskedLM(MotianPreTrainedModel):
    """AutoModelForMaskedLM: logits (B, L, vocab) everywhere, as HF users expect."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **kwargs):
        out = self.motian(input_ids, attention_mask, token_type_ids, position_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.reshape(-1))
        return MaskedLMOutput(loss=loss, logits=out.logits)


class MotianForSequenceClassification(MotianPreTrainedModel):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **kwargs):
        out = self.motian(input_ids, attention_mask, token_type_ids, position_ids, labels=labels)
        return SequenceClassifierOutput(loss=out.loss, logits=out.logits)


class MotianForTokenClassification(MotianPreTrainedModel):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, **kwargs):
        out = self.motian(input_ids, attention_mask, token_type_ids, position_ids, labels=labels)
        return TokenClassifierOutput(loss=out.loss, logits=out.logits)


class MotianForCausalLM(MotianPreTrainedModel, GenerationMixin):
    """AutoModelForCausalLM: logits (B, L, vocab), and `generate()` (transformers'
    GenerationMixin: greedy, sampling, beam search) with motian's own `KVCache` as
    `past_key_values`, decoding exactly as `motian generate` does: positions count real tokens
    only (a left-padded prompt reads as it would alone), and the cache is the one
    motian.serving.generate fills. For decoders GPT-2's classes cannot express (an embedding
    LayerNorm, relative positions, Post-LN, ...); a GPT-2-shaped one (`motian.model.hf.
    gpt2_mismatches`, recipe gpt2-demo) is exported as a native GPT2LMHeadModel instead.

    A plain call (no `past_key_values`, `use_cache` not set) is the motian forward unchanged,
    what the export parity check compares. TUPE and DeBERTa positions have no cache: their
    models generate by recomputing the whole sequence every step."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: the model keeps a KVCache

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                past_key_values=None, use_cache=None, token_type_ids=None, **kwargs):
        # token_type_ids: accepted and ignored, as CausalLM reads no segments; the exported
        # BertTokenizer returns them, and generate() refuses inputs the model does not name.
        cache = past_key_values if isinstance(past_key_values, KVCache) else None
        cacheable = self.config.motian.get("position") not in ("tupe", "deberta")
        if cache is None and use_cache and cacheable:
            cache = KVCache(self.motian.config.layers)
        if cache is not None and attention_mask is not None \
                and attention_mask.shape[-1] > input_ids.shape[1]:
            attention_mask = attention_mask[:, -input_ids.shape[1]:]  # HF passes the full mask
        out = self.motian(input_ids, attention_mask, position_ids, labels=labels, cache=cache)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None,
                                      attention_mask=None, use_cache=None, **kwargs):
        """The tokens the cache has not read yet (all of them without a cache), with positions
        counted over real tokens as motian.serving.generate counts them."""
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
        read = past_key_values.length if isinstance(past_key_values, KVCache) else 0
        return {"input_ids": input_ids[:, read:], "attention_mask": attention_mask[:, read:],
                "position_ids": positions[:, read:], "past_key_values": past_key_values,
                "use_cache": use_cache}

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder(beam_idx)  # beam search keeps the rows of its chosen beams
        return past_key_values


class MotianForQuestionAnswering(MotianPreTrainedModel):
    """AutoModelForQuestionAnswering: start/end logits (B, L), padding at -1e4."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, **kwargs):
        out = self.motian(input_ids, attention_mask, token_type_ids, position_ids,
                          start_positions=start_positions, end_positions=end_positions)
        return QuestionAnsweringModelOutput(loss=out.loss, start_logits=out.logits,
                                            end_logits=out.end_logits)


class MotianForMultipleChoice(MotianPreTrainedModel):
    """AutoModelForMultipleChoice: inputs (B, C, L), logits (B, C)."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                **kwargs):
        out = self.motian(input_ids, attention_mask, token_type_ids, labels=labels)
        return MultipleChoiceModelOutput(loss=out.loss, logits=out.logits)


# motian head -> (wrapper class, the Auto class that loads it)
WRAPPERS = {
    "MotianModel": (MotianModelForHF, "AutoModel"),
    "MaskedLM": (MotianForMaskedLM, "AutoModelForMaskedLM"),
    "SequenceClassification": (MotianForSequenceClassification,
                               "AutoModelForSequenceClassification"),
    "TokenClassification": (MotianForTokenClassification, "AutoModelForTokenClassification"),
    "CausalLM": (MotianForCausalLM, "AutoModelForCausalLM"),
    "SpanExtraction": (MotianForQuestionAnswering, "AutoModelForQuestionAnswering"),
    "MultipleChoice": (MotianForMultipleChoice, "AutoModelForMultipleChoice"),
}
