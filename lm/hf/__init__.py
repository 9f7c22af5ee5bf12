"""Hugging Face interop (optional extra ``hf``): export to a ``transformers`` model directory
(:mod:`.export`, with the modeling code :mod:`.modeling_rnn_lm`) and import fla-hub and BlinkDL
RWKV-7 checkpoints (:mod:`.import_fla`, :mod:`.import_rwkv`)."""
