"""Peak-memory estimate of each stage, from the config and the backbone's shape, before anything loads.

A stage's peak is what it holds all along (the process itself, the backbone's weights, its adapters
with their gradients and AdamW moments) plus the largest of what its phases hold for a moment: a
training step (autograd activations + logits), a forward pass without gradients (hidden states +
logits) or sampling (KV cache + next-token logits). Each recipe declares its phases beside its code
(``memory_workload``); the per-token constants below were measured on this stack and say how. ZeRO (stages with
``launcher: accelerate``) divides what it partitions by the number of ranks.

Pure arithmetic on dataclasses: no torch and no files (``stages.memory.inputs`` reads those), so the
CLI can plan before deciding to start anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stages.io.sections import AdapterSection
from stages.registry import spec

if TYPE_CHECKING:  # the config imports the stage table, whose specs import this module
    from stages.io.config import PipelineConfig

MiB = 1 << 20
Device = Literal["cpu", "cuda"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes nf4: 4-bit codes plus one fp32 absmax per block of 64 weights (its default blocksize).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
# Loading a 4-bit backbone on the CPU leaves the checkpoint behind in RSS: the loader reads it through
# a memory map that stays mapped, and the heap keeps the buffers it quantized from. Measured +2.0 x the
# checkpoint's bytes (34M-parameter fp32 checkpoint: +130 MB file pages, +150 MB heap), which is why
# QLoRA saves no host RAM on the CPU (shared/STACK-NOTES.md says the same).
NF4_CPU_LOAD_RESIDUE = 2.0
# An adapter weight is fp32 (PEFT keeps adapters in fp32 on a bf16 base); a trainable one also has a
# gradient and AdamW's two fp32 moments.
ADAPTER_BYTES, GRADIENT_BYTES, MOMENTS_BYTES = 4, 4, 8

# Tensors autograd saves per token per decoder layer in a training step (frozen base, SDPA attention),
# as (x hidden, x intermediate) elements, measured with saved_tensors_hooks on Llama layers of 512
# hidden and 1024 / 2048 intermediate; no seq^2 term (SDPA on the CPU keeps no attention matrix).
# LoRA on all linear layers: 8.4 h + 4.0 i (used as 8.5 h + 4 i). By hand: two RMSNorm inputs and
# outputs (4h), q, k, v after RoPE and the attention output (4h), the o_proj input (h); gate,
# SiLU(gate), up and their product (4i).
# P-tuning v2: 18.4 h at i = 4 h - frozen linear layers save no input (the down_proj input goes).
# DoRA and AdaLoRA save what LoRA saves per token (their extra tensors are per layer: DoRA's weight norm,
# AdaLoRA's singular values), so they take LoRA's figures; not measured on their own.
TRAIN_ELEMENTS_PER_TOKEN: dict[str, tuple[float, float]] = {
    "lora": (8.5, 4.0),
    "qlora": (8.5, 4.0),
    "dora": (8.5, 4.0),
    "adalora": (8.5, 4.0),
    "ptuning_v2": (6.4, 3.0),
}
# Bytes per activation element: bf16 saves 0.83 x fp32's bytes, not half (measured), because RMSNorm
# computes in fp32 and PEFT casts every LoRA input to the adapter's fp32.
ACTIVATION_BYTES: dict[str, float] = {"float32": 4, "bfloat16": 3.3, "float16": 3.3}
# The backward's activation gradients and a layer's temporaries on top of the saved tensors: measured
# peak / saved = 1.3 - 1.6 with malloc's mmap threshold pinned (so freed memory goes back to the OS).
TRAIN_LIVE_FACTOR = 1.4
# A forward without gradients frees each layer's intermediates as it goes; at the widest point of a
# LoRA MLP the base and adapter outputs of gate and up, SiLU and the product are alive: about 5 i + 6 h
# per token (measured live peak 1.6 - 1.7 x of a 3 i + 4 h count, same setup).
FORWARD_ELEMENTS_PER_TOKEN_H = 6.0
FORWARD_ELEMENTS_PER_TOKEN_I = 5.0
# Host RSS / live bytes of those transients on the CPU. glibc's malloc raises its mmap threshold to the
# size of the largest block it has freed (up to 32 MB), so after the first step activations come from
# the heap, and the holes that freed temporaries leave there stay resident. Measured 1.2 - 2.1 for one
# step of 0.8M - 34M-parameter Llamas, more over a stage's repeated steps (the reward stage's RSS grows
# for two steps); 2.0 is what bench/memory_plan.py calibrates. CUDA's caching allocator is taken to
# hand what it caches on to the next phase (not measured: no GPU was lent to the task that wrote this).
HEAP_RETENTION: dict[str, float] = {"cpu": 2.0, "cuda": 1.0}
# Vocabulary-wide tensors alive at once, each fp32: the logits, their log-softmax (saved for backward),
# exp() for the entropy, and a gradient (or, when sampling, the temperature-scaled scores and probs).
LOGIT_COPIES = 4
LOGIT_BYTES = 4

DEEPSPEED_IMPORT = 25 * MiB  # `import deepspeed` on top, per rank
LAUNCHER_PROCESS = 230 * MiB  # the `accelerate launch` parent, once per machine
# The CUDA context of one process on its GPU (kernels, cuBLAS workspace). Not measured here (no GPU
# was lent to the task that wrote this); torch 2.x typically takes 0.3 - 0.6 GB.
CUDA_CONTEXT = 512 * MiB

# TRL's trainers score tokens with a fused, chunked LM head (trl.kernels.chunked_logprob): they never
# hold more than a tile of 4096 tokens x 32768 vocabulary entries (the SFT and DPO plans' logits).
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only backbone's config.json (Llama-style names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    gated_mlp: bool = True  # gate/up/down projections (Llama, Mistral, Qwen); False: up/down only
    checkpoint_dtype: str = "float32"  # what the weight files hold (config.json "dtype")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer, by its usual module name."""
        h, i, q = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim
        layers = {
            "q_proj": (h, q),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (q, h),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if self.gated_mlp:
            layers["gate_proj"] = (h, i)
        return layers

    @property
    def linear_parameters(self) -> int:
        """The decoder layers' linear weights: what nf4 quantizes."""
        return self.num_layers * sum(i * o for i, o in self.linear_layers().values())

    @property
    def other_parameters(self) -> int:
        """Embeddings, an untied LM head, and the RMSNorm weights (two per layer plus the final one)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def parameters(self) -> int:
        return self.linear_parameters + self.other_parameters


@dataclass(frozen=True)
class DataShape:
    """Token counts of the datasets the stages read (longest rows: a batch is padded to its longest)."""

    demos: int  # SFT demonstrations
    demo_tokens: int  # longest demonstration: prompt + completion + special tokens
    prompts: int  # distinct SFT prompts (PPO and RRHF sample from these)
    prompt_tokens: int  # longest of them
    prompt_tokens_min: int  # shortest of them (sets how many positions PPO computes logits for)
    pairs: int  # preference pairs
    pair_tokens: int  # longest side of a pair: prompt + the longer response + EOS
    eval_prompts: int  # evaluation prompts
    eval_prompt_tokens: int  # longest of them
    ranked_groups: int = 0  # RRHF offline groups (data.ranked)
    ranked_candidates: int = 0  # most responses in one group
    ranked_tokens: int = 0  # longest query + response + EOS


@dataclass(frozen=True)
class Phase:
    """One moment of a stage that holds transient memory on top of what the stage holds all along."""

    name: str
    kind: Literal["train", "forward", "generate"]
    rows: int  # sequences in the batch
    tokens: int  # their padded length (for sampling: prompt + new tokens, the KV cache's length)
    logit_tokens: int  # positions that get vocabulary-wide logits at once
    vocab_chunk: int | None = None  # a chunked LM head holds only this many vocabulary entries
    graphs: int = 1  # autograd graphs alive at once (PPO backpropagates policy, then value)
    knobs: tuple[str, ...] = ()  # the config keys that size this phase, for the refusal's suggestion


@dataclass(frozen=True)
class Workload:
    """What a stage holds: adapters (and scalar heads) on the backbone, and its phases."""

    stage: str
    trainable_adapters: int
    frozen_adapters: int
    phases: tuple[Phase, ...]
    trainable_heads: int = 0  # Linear(hidden, 1) score/value heads
    frozen_heads: int = 0


@dataclass(frozen=True)
class Parallel:
    """How a stage's processes share the work: one local process, or ZeRO data-parallel ranks."""

    launched: bool = False  # ranks of `accelerate launch` on a DeepSpeed engine (launcher: accelerate)
    zero_stage: int = 0  # 0: not ZeRO; 2: optimizer state + gradients partitioned; 3: parameters too
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state (and its gradients) in host RAM
    offload_params: bool = False  # ZeRO-3 parameter partitions in host RAM
    world_size: int = 1  # ranks over all machines: ZeRO partitions over these
    local_ranks: int = 1  # ranks on this machine: their host memory adds up here


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one rank of one stage. ``total`` is on the stage's device (host RAM when that is
    the CPU); ``host`` is what the rank keeps in host RAM besides, when the device is a GPU."""

    stage: str
    device: Device
    peak_phase: str
    ranks: int
    weights: int
    adapters_optimizer: int
    activations: int
    logits: int
    kv_cache: int
    overhead: int  # the process (CPU) or the CUDA context (GPU)
    host: int  # GPU only: the process and what ZeRO offloads; 0 on CPU, where it is all in ``total``
    launcher: int  # the `accelerate launch` parent process, once per machine (0 for local stages)
    knobs: tuple[str, ...] = ()  # config keys that size the peak phase

    @property
    def total(self) -> int:
        return self.weights + self.adapters_optimizer + self.activations + self.logits + self.kv_cache + self.overhead

    @property
    def host_total(self) -> int:
        """Host RAM over all of this machine's ranks (and their launcher)."""
        per_rank = self.total if self.device == "cpu" else self.host
        return per_rank * self.ranks + self.launcher


def weights_bytes(shape: ModelShape, dtype: str, nf4: bool) -> int:
    """The frozen backbone: params x bytes, or nf4 linear layers with the rest in fp32 (PEFT's
    prepare_model_for_kbit_training casts every weight it did not quantize to fp32)."""
    if not nf4:
        return shape.parameters * DTYPE_BYTES[dtype]
    return math.ceil(shape.linear_parameters * NF4_BYTES_PER_PARAM) + shape.other_parameters * 4


def adapter_parameters(shape: ModelShape, adapter: AdapterSection) -> int:
    """Parameters of one adapter: LoRA r x (in + out) on each targeted linear layer of every decoder
    layer ("all-linear" is every one but the LM head), plus DoRA's magnitude (out) and AdaLoRA's r
    singular values (its initial rank: pruning masks them, the memory stays); P-tuning v2 a key and a
    value prefix per layer."""
    if adapter.kind == "ptuning_v2":
        return adapter.num_virtual_tokens * shape.num_layers * 2 * shape.kv_dim
    layers = shape.linear_layers()
    if adapter.target_modules == "all-linear":
        targets = list(layers.values())
    else:
        names = [adapter.target_modules] if isinstance(adapter.target_modules, str) else adapter.target_modules
        # A name outside the Llama set is counted as a hidden x hidden layer.
        square = (shape.hidden_size, shape.hidden_size)
        targets = [next((v for k, v in layers.items() if name.endswith(k)), square) for name in names]
    extra = {"dora": lambda i, o: o, "adalora": lambda i, o: adapter.r}.get(adapter.kind, lambda i, o: 0)
    return shape.num_layers * sum(adapter.r * (i + o) + extra(i, o) for i, o in targets)


def phase_bytes(shape: ModelShape, phase: Phase, dtype: str, adapter_kind: str, device: Device) -> tuple[int, int, int]:
    """(activations, logits, kv cache) a phase holds at its peak, for one rank."""
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_layers
    tokens, element = phase.rows * phase.tokens, ACTIVATION_BYTES[dtype]
    if phase.kind == "train":
        per_h, per_i = TRAIN_ELEMENTS_PER_TOKEN[adapter_kind]
        activations = phase.graphs * tokens * layers * (per_h * h + per_i * i) * TRAIN_LIVE_FACTOR * element
    else:
        # Scoring keeps only the final hidden states (stages.model.sequences.final_hidden_states), not every layer's.
        activations = tokens * (FORWARD_ELEMENTS_PER_TOKEN_H * h + FORWARD_ELEMENTS_PER_TOKEN_I * i) * element
    kv = 2 * layers * tokens * shape.kv_dim * DTYPE_BYTES[dtype] if phase.kind == "generate" else 0
    vocab = min(shape.vocab_size, phase.vocab_chunk or shape.vocab_size)
    logits = phase.logit_tokens * vocab * LOGIT_COPIES * LOGIT_BYTES
    retained = HEAP_RETENTION[device]
    return int(activations * retained), int(logits * retained), int(kv * retained)


def estimate(
    workload: Workload, shape: ModelShape, dtype: str, adapter: AdapterSection, parallel: Parallel, device: Device
) -> Estimate:
    """Peak memory of one rank of ``workload``: what it holds all along plus its largest phase."""
    nf4 = adapter.kind == "qlora"
    world, zero = parallel.world_size, parallel.zero_stage
    on_gpu = device == "cuda"  # offloading to the CPU from the CPU moves nothing
    weights, offloaded = weights_bytes(shape, dtype, nf4), 0
    if nf4 and not on_gpu:
        weights += int(NF4_CPU_LOAD_RESIDUE * shape.parameters * DTYPE_BYTES[shape.checkpoint_dtype])
    if zero >= 3:
        weights //= world
        if parallel.offload_params and on_gpu:
            weights, offloaded = 0, weights
        layer = shape.linear_parameters // shape.num_layers
        weights += 2 * layer * DTYPE_BYTES[dtype]  # the gathered layer and the prefetched next one
    resident, optimizer = _adapter_state_bytes(workload, shape, adapter, parallel)
    if parallel.offload_optimizer and zero and on_gpu:
        adapters_optimizer, offloaded = resident, offloaded + optimizer
    else:
        adapters_optimizer = resident + optimizer

    def transient(phase: Phase) -> tuple[int, int, int]:
        return phase_bytes(shape, phase, dtype, adapter.kind, device)

    peak = max(workload.phases, key=lambda phase: sum(transient(phase)))
    activations, logits, kv = transient(peak)
    process = spec(workload.stage).import_overhead_mib * MiB + (DEEPSPEED_IMPORT if parallel.launched else 0)
    overhead, host = (process, 0) if device == "cpu" else (CUDA_CONTEXT, process + offloaded)
    return Estimate(
        stage=workload.stage,
        device=device,
        peak_phase=peak.name,
        ranks=parallel.local_ranks,
        weights=weights,
        adapters_optimizer=adapters_optimizer,
        activations=activations,
        logits=logits,
        kv_cache=kv,
        overhead=overhead,
        host=host,
        launcher=LAUNCHER_PROCESS if parallel.launched else 0,
        knobs=peak.knobs,
    )


def _adapter_state_bytes(
    workload: Workload, shape: ModelShape, adapter: AdapterSection, parallel: Parallel
) -> tuple[int, int]:
    """(resident, optimizer) bytes of one rank's adapters and heads: ``resident`` (their weights) stays on
    the device; ``optimizer`` (gradients and AdamW moments, partitioned by ZeRO) may be offloaded."""
    per_adapter = adapter_parameters(shape, adapter)
    head = shape.hidden_size + 1
    trainable = workload.trainable_adapters * per_adapter + workload.trainable_heads * head
    frozen = workload.frozen_adapters * per_adapter + workload.frozen_heads * head
    world, zero = parallel.world_size, parallel.zero_stage
    resident = (trainable + frozen) * ADAPTER_BYTES
    grads, moments = trainable * GRADIENT_BYTES, trainable * MOMENTS_BYTES
    if zero >= 1:
        moments = (moments + trainable * ADAPTER_BYTES) // world  # with DeepSpeed's fp32 master partition
    if zero >= 2:
        grads //= world
    if zero >= 3:
        resident //= world
    return resident, grads + moments


def stage_workload(stage: str, cfg: PipelineConfig, data: DataShape, parallel: Parallel = Parallel()) -> Workload:
    """The phases of one rank of ``stage`` as its code runs them, sized from the config and the data's
    lengths: the stage's own ``memory_workload`` (in its spec, beside its recipe, so the two change
    together). Batch sizes are per rank (each rank trains its share of a global batch of batch x ranks).
    Raises ``ValueError`` for a stage that declares none."""
    workload = spec(stage).memory_workload
    if workload is None:
        raise ValueError(f"stage {stage}: its StageSpec declares no memory_workload, so rlhf plan cannot size it")
    return workload(cfg, data, parallel)


def evaluation_sampling(cfg: PipelineConfig, data: DataShape, max_new_tokens: int, knob: str) -> Phase:
    """Sampling held-out prompts (stages.model.generation.generate), ``eval.batch_size`` at a time."""
    rows = min(cfg.eval.batch_size, cfg.eval.num_prompts, data.eval_prompts)
    return Phase(
        "evaluation sampling",
        "generate",
        rows,
        data.eval_prompt_tokens + max_new_tokens,
        rows,
        knobs=("eval.batch_size", knob),
    )
