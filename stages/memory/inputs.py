"""What the memory plan reads from files and from the machine: the backbone's shape (config.json, never
the weights), the token lengths of the configured datasets, the ZeRO setup of a DeepSpeed JSON, and
the memory available now. Torch is imported only to ask a CUDA device for its free memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stages.io.backbone_files import built_location
from stages.io.config import DEEPSPEED_PRESETS, ConfigError, PipelineConfig
from stages.io.data import load_rollout_prompts, stored_dataset
from stages.io.dataset_store import StoredDataset
from stages.io.deepspeed_config import INFRA
from stages.io.formats import RESPONSE_FIELDS, Prompt, prompt_text
from stages.memory.plan import DTYPE_BYTES, DataShape, ModelShape, Parallel
from stages.registry import spec

DEEPSPEED_DIR = INFRA / "deepspeed"
# BOS before a prompt and EOS after a response: tokenizers may add them on top of the text's tokens.
SPECIAL_TOKENS = 2
# A chat template's tokens around each message (role header, end of turn) and the generation prompt: an
# allowance, since the plan reads tokenizer.json without rendering templates (Llama-3's header is 4-5 tokens).
TEMPLATE_TOKENS_PER_MESSAGE = 6


def read_model_shape(cfg: PipelineConfig) -> ModelShape:
    """The backbone's shape from its config.json: a local folder (a built-in backbone once built) or a hub
    id already in the local HF cache. Raises ``ConfigError`` naming backbone.name, ``BackboneError`` for a
    built-in backbone not built yet."""
    location = built_location(cfg.backbone)
    if Path(location).is_dir():
        path = Path(location) / "config.json"
        if not path.is_file():
            raise ConfigError(f"backbone.name={cfg.backbone.name!r}: {location} has no config.json")
        config = json.loads(path.read_text())
        config = config.get("text_config", config)  # a vision-language model's language half
    else:
        config = _hub_config(cfg)
    return shape_from_config(config, cfg.backbone.name)


def _hub_config(cfg: PipelineConfig) -> dict[str, Any]:
    from transformers import AutoConfig  # only for hub ids: it imports torch

    try:
        config = AutoConfig.from_pretrained(
            cfg.backbone.name,
            revision=cfg.backbone.revision,
            local_files_only=True,
            trust_remote_code=cfg.backbone.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"backbone.name={cfg.backbone.name!r}: no config.json in the local Hugging Face cache, so its memory "
            f"cannot be planned (download it: `huggingface-cli download {cfg.backbone.name} config.json`, or use "
            f"--skip-memory-check) ({err.__class__.__name__})"
        ) from None
    return config.get_text_config().to_dict()


def shape_from_config(config: dict[str, Any], name: str) -> ModelShape:
    """A ``ModelShape`` from a config.json dict, with transformers' defaults for the keys it may omit."""

    def first(*keys: str, default: Any = None) -> Any:
        found = next((config[k] for k in keys if config.get(k) is not None), default)
        if found is None:
            raise ConfigError(
                f"backbone.name={name!r}: config.json has none of {list(keys)}; the memory plan "
                "knows decoder-only configs with Llama-style keys (use --skip-memory-check)"
            )
        return found

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    gated = "intermediate_size" in config  # Llama-family configs; GPT-2 style ones say n_inner
    return ModelShape(
        vocab_size=int(first("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        num_layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
        num_heads=heads,
        num_kv_heads=int(first("num_key_value_heads", default=heads)),
        head_dim=int(first("head_dim", default=hidden // heads)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),  # transformers' default
        gated_mlp=gated,
        checkpoint_dtype=_checkpoint_dtype(config),
    )


def _checkpoint_dtype(config: dict[str, Any]) -> str:
    """What the weight files hold: transformers 5 writes "dtype", older versions "torch_dtype"."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in DTYPE_BYTES else "float32"


def read_data_shape(cfg: PipelineConfig) -> DataShape:
    """Token counts of the datasets the configured stages read, with the backbone's tokenizer (its
    tokenizer.json, without transformers) or, if it has none here, UTF-8 bytes: an upper bound for
    byte-level BPE and byte-fallback tokenizers. Each length counts BOS and EOS on top.

    Row counts come from the dataset store (``stages.io.dataset_store``); the longest row is found without
    tokenizing every row: rows are tokenized in order of their UTF-8 size, which bounds their token count,
    until no untokenized row can be longer than the longest found (``_longest_row``).
    """
    count = _token_counter(cfg)
    stages = set(cfg.run.stages)
    always = cfg.data.chat_template == "always"
    generative = bool(stages - {"reward"})  # sft, rrhf and ppo read the demonstrations' prompts and eval
    demos = stored_dataset(cfg.data.sft, "sft", cfg.task) if generative else None
    rolls_out = any("prompts" in spec(stage).optional_datasets for stage in stages)  # the registry's RL stages
    prompts = _rollout_prompts(cfg, demos) if rolls_out else []
    prompt_counts = _prompt_counts(count, always, prompts)
    pairs = stored_dataset(cfg.data.preferences, "preferences", cfg.task) if "reward" in stages else None
    evals = stored_dataset(cfg.data.eval, "eval", cfg.task) if generative else None
    ranked = stored_dataset(cfg.data.ranked, "ranked", cfg.task) if cfg.data.ranked and "rrhf" in stages else None
    candidates = max((len(r["responses"]) for r in ranked.records()), default=0) if ranked else 0
    return DataShape(
        demos=demos.rows if demos else 0,
        demo_tokens=_longest_row(demos, count, always, responses=True),
        prompts=len(prompts),
        prompt_tokens=_longest(prompt_counts),
        prompt_tokens_min=min(prompt_counts, default=0) + SPECIAL_TOKENS,
        pairs=pairs.rows if pairs else 0,
        pair_tokens=_longest_row(pairs, count, always, responses=True),
        eval_prompts=evals.rows if evals else 0,
        eval_prompt_tokens=_longest_row(evals, count, always, responses=False),
        ranked_groups=ranked.rows if ranked else 0,
        ranked_candidates=candidates,
        ranked_tokens=_longest_row(ranked, count, always, responses=True),
    )


ROWS_AT_ONCE = 512  # rows tokenized at a time while the longest is searched for


def _longest_row(
    dataset: StoredDataset | None, count: Callable[[list[str]], list[int]], always: bool, responses: bool
) -> int:
    """The longest row's tokens (prompt + template allowance, + its longest response when ``responses``) +
    ``SPECIAL_TOKENS``: rows in order of an upper bound of their tokens (UTF-8 bytes + 1 per text), stopping
    once no bound left exceeds the longest found. The bound holds for byte-level BPE and byte-fallback
    tokenizers (a token covers at least a byte); a normalizer that expands text (NFKC's ligatures) can
    exceed it, so for those the figure is, like the rest of the plan, an estimate."""
    if dataset is None:
        return 0
    table = dataset.table()
    messages = _messages(table, always)
    bound = table.column("prompt_bytes").to_numpy() + 1 + TEMPLATE_TOKENS_PER_MESSAGE * messages
    if responses:
        bound = bound + table.column("response_bytes").to_numpy() + 1
    order = np.argsort(-bound, kind="stable")
    longest = 0
    for start in range(0, len(order), ROWS_AT_ONCE):
        chunk = order[start : start + ROWS_AT_ONCE]
        if bound[chunk[0]] <= longest:
            break
        records = dataset.records(chunk.tolist())
        prompts = [r["query"] if "query" in r else r["prompt"] for r in records]
        lengths = _prompt_counts(count, always, prompts)
        if responses:
            texts = [
                r["responses"] if "responses" in r else [r[f] for f in RESPONSE_FIELDS[dataset.kind]] for r in records
            ]
            flat = count([t for group in texts for t in group])
            ends = np.cumsum([len(group) for group in texts])
            lengths = [n + max(flat[end - len(group) : end]) for n, group, end in zip(lengths, texts, ends)]
        longest = max(longest, *lengths)
    return longest + SPECIAL_TOKENS


def _messages(table: Any, always: bool) -> np.ndarray:
    """Messages per row's prompt: a string prompt is one under ``data.chat_template: always`` ("" none)."""
    messages = table.column("messages").to_numpy()
    if always:
        nonempty = np.array([key != "" for key in table.column("prompt_key").to_pylist()])
        messages = np.where(messages > 0, messages, nonempty.astype(messages.dtype))
    return messages


def _rollout_prompts(cfg: PipelineConfig, demos: StoredDataset | None) -> list[Prompt]:
    """The distinct prompts PPO and RRHF roll out on (``load_rollout_prompts``), where there are any."""
    if cfg.data.prompts is None and not (demos is not None and any(demos.prompt_styles())):
        return []  # language-modelling demonstrations only: no prompt to roll out on
    return load_rollout_prompts(cfg.data, cfg.task)


def _prompt_counts(count: Callable[[list[str]], list[int]], always: bool, prompts: list[Prompt]) -> list[int]:
    """Token counts of prompts: a templated one's words plus the template allowance per message (a string
    prompt is one user message under ``data.chat_template: always``)."""
    texts = count([prompt_text(p) for p in prompts])
    messages = [len(p) if isinstance(p, list) else int(always and bool(p)) for p in prompts]
    return [n + TEMPLATE_TOKENS_PER_MESSAGE * m for n, m in zip(texts, messages)]


def _longest(lengths: list[int]) -> int:
    return max(lengths, default=0) + SPECIAL_TOKENS


def _token_counter(cfg: PipelineConfig) -> Callable[[list[str]], list[int]]:
    """texts -> token counts, from the backbone's tokenizer.json when one is here."""
    path = _tokenizer_file(cfg)
    if path is None:
        return lambda texts: [len(t.encode()) for t in texts]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    return lambda texts: [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _tokenizer_file(cfg: PipelineConfig) -> Path | None:
    location = built_location(cfg.backbone)
    if Path(location).is_dir():
        path = Path(location) / "tokenizer.json"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(location, "tokenizer.json", revision=cfg.backbone.revision)
    return Path(found) if isinstance(found, str) else None


def read_parallel(cfg: PipelineConfig, stage: str) -> Parallel:
    """One local process, or the ZeRO setup of ``distributed.deepspeed`` for a stage launched with
    accelerate (ranks on this machine: the processes spread evenly over the machines)."""
    if cfg.launcher(stage) != "accelerate":
        return Parallel()
    dist = cfg.distributed
    zero_stage, offload_optimizer, offload_params = read_zero_config(dist.deepspeed)
    return Parallel(
        launched=True,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        world_size=dist.num_processes,
        local_ranks=-(-dist.num_processes // dist.num_machines),
    )


def read_zero_config(deepspeed: str) -> tuple[int, bool, bool]:
    """(zero stage, optimizer offloaded, params offloaded) of a preset name or a DeepSpeed JSON path."""
    path = DEEPSPEED_DIR / f"{deepspeed}.json" if deepspeed in DEEPSPEED_PRESETS else Path(deepspeed).expanduser()
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed: {deepspeed}: no such file")
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"distributed.deepspeed: {path}: no readable zero_optimization.stage ({err})") from None

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")

    return stage, offloaded("offload_optimizer"), offloaded("offload_param")


def available_host_memory() -> int | None:
    """Bytes of host RAM available now (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def available_gpu_memory() -> int:
    """Free bytes on the current CUDA device."""
    import torch

    return int(torch.cuda.mem_get_info()[0])
