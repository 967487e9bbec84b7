"""Build the model to train from a recipe: load it, apply YaRN to its config, add LoRA, enable checkpointing.

YaRN goes into the config *before* the weights load (`yarnkit.patch.apply_yarn`, the recipe's `yarn` section), so
the rotary modules are built scaled and `save_pretrained` writes `rope_parameters` with the scaling. LoRA is
peft's, optionally with full-rank trainable embeddings and norms (LongLoRA's `embed,norm`). `model.init=scratch`
builds random weights from the named model's config reshaped by `model.scratch` (its tokenizer is kept), for
pretraining experiments. `model.sink_token` adds a dedicated sink token (yarnkit/sink_token.py); under LoRA its
embedding row is trained through peft's `trainable_token_indices` (tied heads included) unless `embed_tokens` is
already fully trained via `lora.trainable_extra`. The speed keys (`model.kernels`, `checkpoint_policy`,
`compile_layers`) are applied in that order through `yarnkit.train.speed`; `model.yarnkit_speed` records what
runs. This module does not train; `yarnkit.train.trainer` does. Tested by `python -m pytest tests/test_trainer.py
tests/test_speed.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from yarnkit.models import load_config

from yarnkit.model_files import check_safetensors, local_hf_dir
from yarnkit.patch import YarnArgs, apply_yarn
from yarnkit.sink_token import add_sink_token, padded_vocab_size, register_sink_token
from yarnkit.errors import RecipeError
from yarnkit.sdpa import use_sdpa_kernel
from yarnkit.train.speed import (apply_liger, check_attention, compile_layers, compile_missing, full_checkpointing,
                                 keep_attention_checkpointing, liger_missing, resolve_choice, tile_mlps)


@dataclass
class ScratchArgs:
    """Shape of a from-scratch model (`model.init=scratch`); other settings come from `model.name_or_path`'s config."""

    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1536
    context: int = 1024  # max_position_embeddings


@dataclass
class ModelArgs:
    name_or_path: str = "smollm2-135m"  # HF dir, hub id (cached), .gguf, or a bundled name
    init: str = "pretrained"  # pretrained: its weights | scratch: random weights shaped by model.scratch
    scratch: ScratchArgs = field(default_factory=ScratchArgs)
    sink_token: bool = False  # prepend a dedicated learnable sink token to every training sequence
    sink_token_text: str = "<|sink|>"
    sink_token_init: str = "bos"  # continued training: bos (copy BOS's row) | mean (mean of all rows)
    attn_implementation: str = "sdpa"  # sdpa | flex_attention | flash_attention_2|3|4 (if installed) | eager
    sdpa_kernel: str = "auto"  # with sdpa: auto (torch decides) | cudnn (fastest on Hopper) | flash | efficient | math
    gradient_checkpointing: bool = True  # recompute each layer in backward: activations ~ layers x seq x hidden
    checkpoint_layers: int = 0  # with gradient_checkpointing: 0 = every layer, N = only the first N (faster, more memory)
    checkpoint_policy: str = "full"  # full: recompute whole layers | keep_attention: keep SDPA outputs, redo the rest
    keep_attention_layers: int = 0  # with keep_attention: 0 = every checkpointed layer keeps it, N = only the first N
    kernels: str = "auto"  # RMSNorm/SwiGLU/RoPE: auto (Liger-Kernel on CUDA if installed) | liger | torch
    compile_layers: str = "false"  # torch.compile each decoder layer: auto (on CUDA) | true | false
    tiled_mlp: bool = False  # DeepSpeed ALST TiledMLP: MLP over seq/hidden shards, recomputed in backward
    random_init: bool = False  # random weights from name_or_path's config.json (benchmarks of model shapes)
    trust_remote_code: bool = False


@dataclass
class LoraArgs:
    enabled: bool = False
    r: int = 16
    alpha: int = 64
    dropout: float = 0.05
    target_modules: str = "all-linear"  # peft's shorthand: every linear layer except the output head
    trainable_extra: list[str] = field(default_factory=list)  # fully trained too, e.g. [embed_tokens, norm]


def scaled_config(model: ModelArgs, yarn: YarnArgs):
    """The checkpoint's config with the recipe's RoPE scaling applied (no weights loaded)."""
    config = load_config(model.name_or_path, trust_remote_code=model.trust_remote_code)
    if model.init == "scratch":
        reshape_for_scratch(config, model.scratch)
    apply_yarn(config, yarn, f"model.name_or_path={model.name_or_path}")
    return config


def reshape_for_scratch(config, shape: ScratchArgs) -> None:
    """Give `config` (in place) the from-scratch shape; head_dim = hidden / heads."""
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise RecipeError(f"model.scratch: hidden={shape.hidden} must divide by heads={shape.heads} and heads by "
                          f"kv_heads={shape.kv_heads}")
    config.num_hidden_layers, config.hidden_size = shape.layers, shape.hidden
    config.num_attention_heads, config.num_key_value_heads = shape.heads, shape.kv_heads
    config.intermediate_size, config.max_position_embeddings = shape.intermediate, shape.context
    config.head_dim = shape.hidden // shape.heads
    for key in ("layer_types", "original_max_position_embeddings"):  # sized for the old shape
        if hasattr(config, key):
            setattr(config, key, None)


def build_model(model_args: ModelArgs, config, lora: LoraArgs, init_device: str | None = None):
    """`(model, tokenizer)` ready for training from `config` (see `scaled_config`): float32 weights (mixed
    precision comes from accelerate/DeepSpeed), no `.to(device)` (ZeRO-3 may have placed shards already).
    `init_device`: where `random_init` weights are drawn (a GPU is much faster than the CPU for 1B parameters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_attention(model_args.attn_implementation, model_args.sdpa_kernel)
    use_sdpa_kernel(model_args.sdpa_kernel)
    location = local_hf_dir(model_args.name_or_path)
    if Path(location).is_dir() and model_args.init == "pretrained" and not model_args.random_init:
        check_safetensors(Path(location))  # torn weights fail naming the file, not deep inside transformers
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=model_args.trust_remote_code)
    options = dict(dtype=torch.float32, attn_implementation=model_args.attn_implementation,
                   trust_remote_code=model_args.trust_remote_code)
    if model_args.init == "scratch" or model_args.random_init:
        if model_args.sink_token:  # in the vocabulary before the weights exist: its row is initialised like any other
            config.yarnkit_sink_token_id, _ = register_sink_token(tokenizer, config, model_args.sink_token_text)
            config.vocab_size = max(config.vocab_size, padded_vocab_size(len(tokenizer)))
        with torch.device(init_device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(location, config=config, use_safetensors=True, **options)
    if model_args.sink_token:
        add_sink_token(model, tokenizer, model_args.sink_token_text, model_args.sink_token_init)
    model.config.use_cache = False
    runs = {"attention": model_args.attn_implementation + (f"/{model_args.sdpa_kernel}"
                                                           if model_args.attn_implementation == "sdpa" else "")}
    liger = resolve_choice("model.kernels", model_args.kernels, liger_missing(model), "liger", "torch")
    if liger:
        apply_liger(model)  # before peft: Liger patches the plain norm/MLP modules
    runs["norm_swiglu_rope"] = "liger" if liger else "torch"
    if lora.enabled:
        sink = getattr(model.config, "yarnkit_sink_token_id", None) if model_args.sink_token else None
        model = add_lora(model, lora, train_token_ids=[sink] if sink is not None else [])
    runs["checkpointing"] = "off"
    if model_args.gradient_checkpointing and model_args.checkpoint_policy == "keep_attention":
        kept = keep_attention_checkpointing(model, model_args.checkpoint_layers, model_args.keep_attention_layers)
        runs["checkpointing"] = f"keep_attention in {kept} layers"
    elif model_args.gradient_checkpointing:
        full_checkpointing(model)
        if model_args.checkpoint_layers:
            for layer in model.get_decoder().layers[model_args.checkpoint_layers:]:
                layer.gradient_checkpointing = False  # transformers' GradientCheckpointingLayer reads this flag
        if lora.enabled:
            model.enable_input_require_grads()
        runs["checkpointing"] = f"full in {model_args.checkpoint_layers or 'all'} layers"
    if model_args.tiled_mlp:
        tile_mlps(model)
    device = init_device or ("cuda" if torch.cuda.is_available() else "cpu")  # where training runs
    compiled = resolve_choice("model.compile_layers", model_args.compile_layers, compile_missing(device), "true",
                              "false")
    if compiled:
        compile_layers(model)
    runs["decoder_layers"] = "compiled" if compiled else "eager"
    model.yarnkit_speed = runs  # what runs, for the run log (the trainer prints it)
    model.train()
    return model, tokenizer


def add_lora(model, lora: LoraArgs, train_token_ids: list[int] = ()):
    """peft LoRA; `train_token_ids` are embedding rows trained in full (peft trainable tokens) besides the adapters."""
    from peft import LoraConfig, get_peft_model

    extra = {}
    if train_token_ids and "embed_tokens" not in lora.trainable_extra:
        extra["trainable_token_indices"] = {"embed_tokens": list(train_token_ids)}
    if getattr(model.config, "tie_word_embeddings", False) and "ensure_weight_tying" in LoraConfig.__dataclass_fields__:
        extra["ensure_weight_tying"] = True  # a trained embed_tokens copy stays tied to lm_head
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules=lora.target_modules, modules_to_save=list(lora.trainable_extra) or None,
                        **extra)
    return get_peft_model(model, config)
