"""The Hugging Face config of an ``rnn-lm`` model (``model_type: rnn_lm``).

``lm_model`` holds this project's model config (``model:`` of the experiment, a dict); the usual
transformers names (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...) are derived from
it for tools that read them. This file travels in every export directory (``auto_map``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig


def _constant_state(model: Dict[str, Any]) -> bool:
    """True when no layer of the model config keeps a growing state (a hybrid: any attention layer)."""
    import lm.models  # noqa: F401  (registers the families)
    from lm.models.registry import constant_state

    return constant_state(model)


class RnnLMConfig(PretrainedConfig):
    model_type = "rnn_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, lm_model: Optional[Dict[str, Any]] = None, use_cache: bool = True, **kwargs: Any):
        self.lm_model = dict(lm_model or {})
        m = self.lm_model
        self.vocab_size = int(m.get("vocab_size") or 0)
        self.hidden_size = int(m.get("d_model") or 0)
        self.num_hidden_layers = int(m.get("n_layers") or 0)
        self.num_attention_heads = int(m.get("n_heads") or 0)
        self.use_cache = use_cache
        if m.get("family") and not _constant_state(m):  # constant-state families read any length
            self.max_position_embeddings = int(m.get("max_seq_len") or 0)
        # the head is tied inside the model (no separate parameter): transformers must not tie anything
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
