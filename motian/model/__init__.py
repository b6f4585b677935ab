"""The motian Transformer: config and presets, backbone, position schemes, task heads, checkpoints.

Hugging Face interop (`motian.model.hf`) is imported on demand because `transformers` is an
optional extra.
"""

from motian.model.config import EXTRAPOLATING, POSITIONS, PRESETS, ModelConfig, preset
from motian.model.early_exit import EarlyExitClassification  # registers the head in HEADS
from motian.model.elmo import ElmoLM  # registers ELMo's heads in HEADS
from motian.model.heads import (
    HEADS,
    CausalLM,
    MaskedLM,
    ModelOutput,
    MultipleChoice,
    PreTrainingModel,
    SequenceClassification,
    SpanExtraction,
    TokenClassification,
)
from motian.model.io import (
    LoadReport,
    count_parameters,
    from_pretrained,
    load_weights,
    save_pretrained,
    strip_wrapper_prefixes,
    unwrap_model,
)
from motian.model.seq2seq import Seq2SeqLM  # registers the head in HEADS
from motian.model.transformer import MotianModel
from motian.model.xl import TransformerXLLM  # registers the head in HEADS
from motian.model.xlnet import XLNetLM  # registers the head in HEADS

__all__ = [
    "EXTRAPOLATING", "POSITIONS", "PRESETS", "HEADS", "ModelConfig", "preset", "MotianModel",
    "ModelOutput", "MaskedLM", "PreTrainingModel", "SequenceClassification",
    "TokenClassification", "SpanExtraction", "MultipleChoice", "CausalLM", "LoadReport",
    "count_parameters", "from_pretrained", "load_weights", "save_pretrained",
    "strip_wrapper_prefixes", "unwrap_model", "Seq2SeqLM", "TransformerXLLM", "XLNetLM",
    "EarlyExitClassification", "ElmoLM",
]
