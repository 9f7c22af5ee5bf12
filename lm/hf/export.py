"""``lm export <run> <dir> --format hf``: a Hugging Face ``transformers`` model directory.

The directory holds ``config.json`` (``model_type: rnn_lm``, ``architectures``, ``auto_map``),
``model.safetensors`` (keys ``model.<LanguageModel key>``, fp32), ``generation_config.json``,
the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, a ``PreTrainedTokenizerFast``
that prepends the end-of-document token like every document in training), the modeling code
(``configuration_rnn_lm.py``, ``modeling_rnn_lm.py``: thin wrappers that import ``lm.models`` and
``kernels`` from the installed ``rnn-lm`` package) and ``export.json`` (step, source, tokenizer
hash). Load it with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm.errors import LMError
from lm.training.export import LoadedModel, check_out_dir, load_model, write_export_dir


def export_hf(source: str, out_dir: str) -> Path:
    """Convert an export, checkpoint or run directory into a transformers model directory."""
    out = Path(out_dir)
    check_out_dir(out)
    loaded = load_model(source)
    return write_hf(loaded, out)


def write_hf(loaded: LoadedModel, out: Path, extra_info: dict | None = None) -> Path:
    """Write ``loaded`` (its model, config and tokenizer) as a transformers directory at ``out``."""
    from lm.hf.configuration_rnn_lm import RnnLMConfig
    from lm.hf.modeling_rnn_lm import RnnLMForCausalLM
    from lm.hf.tokenizer import hf_tokenizer, special_tokens

    cfg = loaded.model.cfg
    if cfg.input_dim or cfg.output_dim:
        raise LMError(
            f"{loaded.source}: model.input_dim/output_dim is set (a continuous-input/output task model); "
            "only token language models export to transformers"
        )
    if loaded.tokenizer_path is None or not Path(loaded.tokenizer_path).is_file():
        raise LMError(
            f"{loaded.source}: the model has no tokenizer file ({loaded.tokenizer_path}); transformers export needs one"
        )
    tokens = special_tokens(loaded.config, loaded.tokenizer_path)
    model_cfg = dict(loaded.config["model"])
    model_cfg["variant"] = cfg.variant  # resolved
    hf_config = RnnLMConfig(
        lm_model=model_cfg, bos_token_id=tokens["eod_id"], eos_token_id=tokens["eod_id"], pad_token_id=tokens["pad_id"]
    )
    RnnLMConfig.register_for_auto_class()
    RnnLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model = RnnLMForCausalLM(hf_config)
    state = {f"model.{k}": v for k, v in loaded.model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LMError(
            f"{loaded.source}: weights do not fit the transformers wrapper (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.float().eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        hf_tokenizer(loaded.tokenizer_path, tokens).save_pretrained(str(tmp))
        info = {
            "format": "hf",
            "step": loaded.step,
            "source": str(loaded.source),
            "parameters": loaded.model.num_parameters(),
            "tokenizer_sha256": loaded.tokenizer_sha256,
            **(extra_info or {}),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=1))

    return write_export_dir(out, fill)
