"""Hugging Face wrappers around motian heads, for configurations BERT cannot express (Pre-LN,
relative positions, GEGLU, decoders).

This file is not imported by motian itself: `motian.model.hf.export_hf` concatenates config.py,
positions.py, transformer.py, heads.py and this file into the exported directory's
`modeling_motian.py`, which `transformers` loads with `trust_remote_code=True`. So the exported
model runs motian's own code, written once, and needs nothing but torch and transformers.
"""

from __future__ import annotations

import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from motian.model.config import ModelConfig
from motian.model.heads import HEADS


class MotianConfig(PretrainedConfig):
    """`motian`: the ModelConfig as a dict; `head` / `head_kwargs`: which motian head to build."""

    model_type = "motian"

    def __init__(self, motian: dict | None = None, head: str = "MaskedLM",
                 head_kwargs: dict | None = None, **kwargs):
        self.motian = dict(motian or {})
        self.head = head
        self.head_kwargs = dict(head_kwargs or {})
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


class MotianForCausalLM(MotianPreTrainedModel):
    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        out = self.motian(input_ids, attention_mask, position_ids, labels=labels)
        return CausalLMOutput(loss=out.loss, logits=out.logits)


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
