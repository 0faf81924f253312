"""Named adapters on one frozen backbone: a registry of kinds, attach/load/save, and safe switching.

Kinds: ``lora``; ``qlora`` (the same LoRA, on the nf4 4-bit backbone); ``dora`` (PEFT's weight-decomposed
LoRA, Liu et al. 2024); ``adalora`` (PEFT's AdaLoRA, Zhang et al. 2023: SVD-form LoRA whose ranks are
pruned to a budget while it trains); ``ptuning_v2`` (PEFT prefix tuning: trained key/value prefixes on
every layer). All adapters of one model share one kind, because PEFT cannot mix LoRA and prefix adapters
in one ``PeftModel``.

AdaLoRA allocates its ranks in the stage that creates the adapter (SFT, reward: ``RankAllocation``
below, once per optimizer update); a stage that continues an adapter (the RL stages) loads it at its
allocated ranks and trains it at those ranks. PEFT lets an AdaLoRA model train one adapter only, so a
stage that trains two (PPO with ``ppo.value_model: separate``) is refused by config validation.

Switching goes only through ``active_adapter``, which restores the previous adapter in ``finally`` and
keeps every adapter's ``requires_grad`` as it was: PEFT's ``set_adapter`` silently turns gradients off
on every other adapter, which would drop e.g. the policy's gradients after a switch to the value adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import (
    AdaLoraConfig,
    AdaLoraModel,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    PrefixTuningConfig,
    get_peft_model,
)
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM

from stages.io import artifacts
from stages.io.config import AdapterSection, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _lora(cfg: AdapterSection, total_steps: int | None) -> PeftConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.kind == "dora",
        task_type="CAUSAL_LM",
    )


def _adalora(cfg: AdapterSection, total_steps: int | None) -> PeftConfig:
    """AdaLoRA starting at rank ``r`` and pruned to an average of ``target_r``: the first and last fifth
    of the stage's updates keep the ranks fixed (PEFT's ``tinit``/``tfinal``), the middle prunes."""
    if total_steps is None:
        raise ValueError("adapter.kind=adalora: the stage must say how many updates it makes (total_steps)")
    return AdaLoraConfig(
        init_r=cfg.r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        total_step=total_steps,
        tinit=total_steps // 5,
        tfinal=total_steps // 5,
        task_type="CAUSAL_LM",
    )


def check_target_modules(
    cfg: AdapterSection, backbone_location: str, revision: str | None = None, trust_remote_code: bool = False
) -> None:
    """Refuse LoRA ``target_modules`` that name no module of the backbone, before anything trains.

    The backbone is built from its config.json on the meta device (no weights are read), and each listed
    name is matched as PEFT matches it (the module's name, or a dotted suffix of it; a string is a regex
    that must match a whole name). Raises ``ConfigError`` naming the key and the Linear layer names that
    exist. ``all-linear`` and P-tuning v2 (which has no target modules) need no check.
    """
    import re

    if cfg.kind == "ptuning_v2" or cfg.target_modules == "all-linear":
        return
    try:
        config = AutoConfig.from_pretrained(backbone_location, revision=revision, trust_remote_code=trust_remote_code)
    except OSError:  # a hub id not downloaded yet: the stage's own load says so
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if isinstance(cfg.target_modules, str):
        missing = [] if any(re.fullmatch(cfg.target_modules, n) for n in names) else [cfg.target_modules]
    else:
        missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"adapter.target_modules: {', '.join(missing)} not found; the backbone has "
            f"{', '.join(linear)} (or use all-linear)"
        )


def _prefix(cfg: AdapterSection, total_steps: int | None) -> PeftConfig:
    return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")


# kind -> PEFT config builder taking the section and the stage's number of updates (which kinds load the
# backbone in 4 bits: ``stages.io.sections.needs_4bit``)
ConfigBuilder = Callable[[AdapterSection, "int | None"], "PeftConfig"]
ADAPTER_KINDS: dict[str, ConfigBuilder] = {
    "lora": _lora,
    "qlora": _lora,
    "dora": _lora,
    "adalora": _adalora,
    "ptuning_v2": _prefix,
}


def _registered(kind: str) -> ConfigBuilder:
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter.kind: unknown kind {kind!r}; choose one of {sorted(ADAPTER_KINDS)}")
    return ADAPTER_KINDS[kind]


def attach_adapter(base: PreTrainedModel, cfg: AdapterSection, name: str, total_steps: int | None = None) -> PeftModel:
    """Wrap the frozen base in a PeftModel with one new trainable adapter called ``name`` (a 4-bit base
    comes k-bit-prepared from ``load_backbone``, in every stage alike). ``total_steps``: the optimizer
    updates the stage makes (AdaLoRA's budget schedule needs it; ``ValueError`` without it)."""
    build = _registered(cfg.kind)
    model = get_peft_model(base, build(cfg, total_steps), adapter_name=name)
    set_trainable(model, [name])
    return model


def load_adapter(
    model: PreTrainedModel | PeftModel, folder: Path, name: str, backbone_fingerprint: str, trainable: bool = False
) -> PeftModel:
    """Load a published adapter artifact under ``name``, refusing one trained on another backbone and one
    whose ``adapter/`` files changed after publishing (a truncated or garbled file is named here, rather
    than failing as a safetensors traceback inside PEFT). Heads are checked by ``heads.load_head``."""
    manifest = artifacts.verify(folder, under="adapter")
    if manifest.get("backbone_fingerprint") != backbone_fingerprint:
        raise artifacts.ArtifactError(
            f"{folder}: adapter was trained on backbone {manifest.get('backbone_fingerprint')}, "
            f"but this run's backbone is {backbone_fingerprint}"
        )
    path = str(Path(folder) / "adapter")
    # PEFT refuses to load a prompt-learning adapter as trainable; load it frozen and unfreeze it below.
    as_trainable = trainable and not _is_prompt_learning(path)
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name, is_trainable=as_trainable)
    else:
        model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=as_trainable)
    if trainable:
        model.peft_config[name].inference_mode = False
        for param_name, param in model.named_parameters():
            if adapter_of(model, param_name) == name and not any(c in param_name + "." for c in CONSTANTS):
                param.requires_grad_(True)
    return model


def _is_prompt_learning(path: str) -> bool:
    return PeftConfig.from_pretrained(path).is_prompt_learning


def save_adapter(model: PeftModel, name: str, dest: Path) -> None:
    """Save one adapter as a standard PEFT folder (``PeftModel.from_pretrained(base, dest)`` loads it)."""
    with tempfile.TemporaryDirectory(dir=Path(dest).parent) as tmp:
        try:
            model.save_pretrained(tmp, selected_adapters=[name])
        except SafetensorError as err:  # a full disk arrives as a Rust error; give it back its errno
            raise artifacts.storage_error(err, Path(dest) / "adapter_model.safetensors") from err
        # PEFT nests every adapter not called "default" in a subfolder named after it.
        source = Path(tmp) / name if name != "default" else Path(tmp)
        shutil.copytree(source, dest)
    _sort_target_modules(Path(dest) / "adapter_config.json")


def _sort_target_modules(config_path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in hash order: sort it so equal adapters are equal bytes
    (artifact digests, and so downstream cache keys, must not depend on PYTHONHASHSEED)."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_of(model: PeftModel, param_name: str) -> str | None:
    """Which named adapter a parameter belongs to (None for base weights)."""
    for name in model.peft_config:
        if f".{name}." in param_name or param_name.endswith(f".{name}"):
            return name
    return None


# Adapter parameters PEFT never trains: AdaLoRA's ``ranknum`` is the rank its scale divides by, a constant
# it keeps out of the saved weights (trained, it would move the scale and be lost on every reload).
CONSTANTS = (".ranknum.",)


def set_trainable(model: PeftModel, names: Iterable[str]) -> None:
    """Exactly the adapters in ``names`` get gradients; every other adapter and the base do not."""
    wanted = set(names)
    for param_name, param in model.named_parameters():
        owner = adapter_of(model, param_name)
        if owner is not None:
            param.requires_grad_(owner in wanted and not any(c in param_name + "." for c in CONSTANTS))


@contextmanager
def active_adapter(model: PeftModel, name: str) -> Iterator[PeftModel]:
    """Run the block with adapter ``name`` active; restore the previous adapter and every adapter's
    ``requires_grad`` afterwards, even if the block raises."""
    grads = {n: p.requires_grad for n, p in model.named_parameters() if adapter_of(model, n) is not None}
    previous = model.active_adapter
    model.set_adapter(name)
    _restore_grads(model, grads)  # undo set_adapter's silent requires_grad=False on the others
    try:
        yield model
    finally:
        model.set_adapter(previous)
        _restore_grads(model, grads)


def _restore_grads(model: PeftModel, grads: dict[str, bool]) -> None:
    for param_name, param in model.named_parameters():
        if param_name in grads:
            param.requires_grad_(grads[param_name])


class RankAllocation:
    """AdaLoRA's rank budget, driven once per optimizer update: ``after_update(n)`` for update ``n``
    (1-based), after ``optimizer.step()`` and before the gradients are zeroed (PEFT's
    ``update_and_allocate`` scores each singular value by ``|p * p.grad|``). Its importance averages are
    training state: ``state_dict``/``load_state_dict`` carry them through a checkpoint, so a resumed
    stage prunes exactly as an uninterrupted one."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.tuner = model.base_model

    @classmethod
    def of(cls, model: PeftModel) -> RankAllocation | None:
        """The allocation of a model whose trainable adapter is a fresh AdaLoRA one (no ranks allocated
        yet), else None: an adapter loaded from an earlier stage keeps the ranks that stage allocated."""
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, AdaLoraModel) or not hasattr(tuner, "rankallocator"):
            return None
        return cls(model) if tuner.peft_config[tuner.trainable_adapter_name].rank_pattern is None else None

    def after_update(self, update: int) -> None:
        self.tuner.update_and_allocate(update)

    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        return {
            "ipt": allocator.ipt,
            "exp_avg_ipt": allocator.exp_avg_ipt,
            "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern,
        }

    def load_state_dict(self, state: dict) -> None:
        allocator = self.tuner.rankallocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            state["ipt"],
            state["exp_avg_ipt"],
            state["exp_avg_unc"],
        )
        self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def pop_rank_patterns(model: PeftModel) -> dict[str, dict]:
    """Take the rank patterns off every AdaLoRA adapter of ``model`` (for ``put_rank_patterns``), so PEFT
    saves and loads a checkpoint at the shapes the modules have now.

    With a rank pattern, PEFT's ``save_pretrained`` drops the pruned ranks (what a published adapter
    should do), and its ``load_adapter`` resizes the modules by the pattern: a checkpoint saved that way
    loses the ranks the budget may bring back, and would be loaded into modules of the other shape.
    """
    patterns = {}
    for name, config in model.peft_config.items():
        if config.peft_type == PeftType.ADALORA and config.rank_pattern is not None:
            patterns[name], config.rank_pattern = config.rank_pattern, None
    return patterns


def put_rank_patterns(model: PeftModel, patterns: dict[str, dict]) -> None:
    for name, pattern in patterns.items():
        model.peft_config[name].rank_pattern = pattern


@contextmanager
def checkpoint_shapes(model: PeftModel) -> Iterator[None]:
    """Save or load a checkpoint's adapters at their current shapes (``pop_rank_patterns``)."""
    patterns = pop_rank_patterns(model)
    try:
        yield
    finally:
        put_rank_patterns(model, patterns)


def count_trainable(model: PeftModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
