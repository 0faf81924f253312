"""The one place a backbone is loaded: dtype, optional nf4 4-bit, frozen, verified, fingerprinted.

``stages.io.backbone_files`` identifies the base weights without importing torch (the flow needs the
fingerprint for cache keys); ``weights_digest`` hashes the loaded weights themselves, which tests use to
prove that training an adapter never changed a byte of the backbone.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.io.backbone_files import (
    BUILTIN_NAMES,
    BackboneError,
    backbone_fingerprint,
    backbone_location,
    is_builtin_chat,
)
from stages.io.config import BackboneSection, PipelineConfig
from stages.io.sections import needs_4bit
from stages.model.builtin_backbone import ensure_builtin_backbone
from stages.model.placement import stage_device
from stages.model.tokenization import Tokenization, generation_end_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stages.model.tokenization import ChatTemplateUse


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str

    def tokenization(self, chat_template: ChatTemplateUse = "auto") -> Tokenization:
        """The tokenization contract of this tokenizer, ending responses also at the end ids of the
        model's ``generation_config`` (``stages.model.tokenization``)."""
        return Tokenization.of(self.tokenizer, chat_template, generation_end_ids(self.model.generation_config))


def resolve_backbone(cfg: BackboneSection) -> str:
    """``backbone_location``, building the built-in backbone first where it is not built yet (the one
    place a stage process builds it; the CLI builds it in its pre-flight)."""
    if cfg.name in BUILTIN_NAMES:
        ensure_builtin_backbone(chat=is_builtin_chat(cfg))
    return backbone_location(cfg)


def stage_backbone(cfg: PipelineConfig) -> tuple[Backbone, Tokenization]:
    """How every stage opens: the backbone as ``cfg`` loads it (nf4 4-bit for QLoRA, ``load_backbone``)
    and the tokenization contract of its tokenizer under ``data.chat_template``."""
    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(cfg.adapter.kind))
    return backbone, backbone.tokenization(cfg.data.chat_template)


def load_backbone(cfg: BackboneSection, quantize_4bit: bool = False) -> Backbone:
    """Load tokenizer and causal LM (fp32/bf16, or nf4 4-bit for QLoRA) onto the stage's device
    (``backbone.device``, ``stages.model.placement``), frozen and verified frozen.

    Raises:
        BackboneError: the model or tokenizer cannot be loaded, or has neither a pad nor an EOS token.
        ConfigError: ``backbone.device: cuda`` where no GPU is visible.
    """
    location = resolve_backbone(cfg)
    device = stage_device(cfg)
    dtype = getattr(torch, cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}  # quantized on loading, where it will compute
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as err:  # hub and file errors span several lines; the first one says what went wrong
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"backbone.name={cfg.name!r}: cannot load from {location} ({reason})") from None
    if quantize_4bit:
        _keep_one_4bit_layout(model)
        _prepare_for_kbit_training(model)
    else:
        model.to(device)
    if tokenizer.pad_token is None:  # many hub models ship without one; batching and generation need it
        if tokenizer.eos_token is None:
            raise BackboneError(f"backbone.name={cfg.name!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    _say_ignored_generation_settings(model, cfg)
    freeze(model)
    return Backbone(model=model, tokenizer=tokenizer, fingerprint=backbone_fingerprint(cfg, quantize_4bit))


# What a model's generation_config can set that changes which token greedy/sampled decoding picks, with
# the value that changes nothing (None: unset). Length limits and end ids are the stage's own.
_NEUTRAL_SETTINGS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": None,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "num_beams": 1,
    "penalty_alpha": None,
    "diversity_penalty": 0.0,
    "watermarking_config": None,
    "stop_strings": None,  # an end condition by text: the stop set holds ids only
}


def ignored_generation_settings(generation_config: Any) -> dict[str, Any]:
    """The settings of a model's ``generation_config`` (a ``transformers.GenerationConfig``) that would
    change sampling and that ``generate`` does not apply, with their values: {} for a neutral one."""
    ignored = {}
    for name, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != neutral:
            ignored[name] = value
    return ignored


def _say_ignored_generation_settings(model: PreTrainedModel, cfg: BackboneSection) -> None:
    """One line naming what the model's ``generation_config`` sets that the stages' sampling ignores
    (``stages.model.generation``), so a user who relied on a hub default learns it did not apply."""
    ignored = ignored_generation_settings(model.generation_config)
    if ignored and os.environ.get("RANK", "0") == "0":
        settings = ", ".join(f"{name}={value}" for name, value in ignored.items())
        print(
            f"backbone {cfg.name}: its generation_config sets {settings}; the stages ignore these and sample "
            "at each stage's own temperature, from the distribution they train on (rlhf export keeps them)",
            flush=True,
        )


def _prepare_for_kbit_training(model: torch.nn.Module) -> None:
    """PEFT's QLoRA preparation: the weights left unquantized (norms, embeddings, the LM head) go to fp32
    (PEFT makes embedding outputs require grad only with gradient checkpointing, which is off).

    Done here, on loading, so every stage computes with the same weights: applied only where an adapter
    was trained, a reward model reloaded in PPO scored its probe texts 8.3e-3 off in bf16 (issue 14,
    fault 3). Gradient checkpointing stays off: it trades compute for memory, and our runs are small.
    """
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _keep_one_4bit_layout(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU fast path, which repacks 4-bit weights in place on the first inference
    forward and unpacks them in ``state_dict()``: after saving an adapter (or hashing the weights) the
    same model then computes different outputs (measured with bitsandbytes 0.50.2: logits off by ~10).
    One layout also makes training and inference numerics agree exactly."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def freeze(model: torch.nn.Module) -> None:
    """Turn off gradients on every base weight and check that it took."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    still = [name for name, p in model.named_parameters() if p.requires_grad]
    if still:
        raise BackboneError(f"backbone is not frozen: {still[:3]} still require gradients")


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base weights and buffers only, named as in the plain model (PEFT wrappers and adapters removed)."""
    if hasattr(model, "get_base_model"):  # a PeftModel: look at the transformers model inside it
        model = model.get_base_model()
    adapter_markers = ("lora_", "ranknum", "modules_to_save")  # ranknum: AdaLoRA's rank scale
    state = model.state_dict(keep_vars=True)
    return {
        name.replace(".base_layer", ""): t for name, t in state.items() if not any(m in name for m in adapter_markers)
    }


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the base weights' bytes; a PEFT wrapper around the same weights gives the same digest."""
    digest = hashlib.sha256()
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in sorted(base_parameters(model).items()):
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if storage in seen:  # tied or aliased weights (PEFT's word_embeddings) count once
            continue
        seen.add(storage)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
