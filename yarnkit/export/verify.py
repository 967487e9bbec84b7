"""Check an exported folder the way its users will load it.

- `verify_hf(dir, model, input_ids)`: a fresh `python -I` subprocess loads `dir` with plain transformers (it
  asserts `yarnkit` was never imported there), runs `input_ids`, and returns its logits, its `rope_parameters`,
  and each rotary module's `inv_freq` and attention scaling. The RoPE it built must be the in-memory model's
  (every rope key of the model's config read back equal, `inv_freq` float32 and equal to 1e-6, the attention
  scaling to 1e-9), and its logits must agree: the metric is max |Δlogit| / max |logit| over the compared
  positions (every `stride`-th one plus the last 128, so positions past the original context are always in).
- `verify_config(dir, tokenizer)`: what both vLLM generations read from the YaRN keys (`rope_keys.check_vllm_rope`)
  and the sink token.
- `verify_gguf(path, model, ...)`: the RoPE llama.cpp builds from the GGUF (`gguf.llama_cpp_rope`) must be the
  model's (inv_freq and attention factor to 1e-6); then transformers' GGUF loader, given that RoPE, must give the
  model's logits (see its docstring).
- `prompt_ids(tokenizer, n)`: a deterministic long prompt: the bundled PG-19 book, tokenized.

Tolerances (`TOLERANCE`) are per dtype: fp32 1e-4 (only summation order differs), bf16/fp16 2e-2. The GGUF check
compares against the model with its weights rounded as the GGUF stores them, so it holds 1e-4 for every type.
Tested by tests/test_export.py, tests/test_export_rope.py and tests/test_export_gguf.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from yarnkit.export import rope_keys
from yarnkit.errors import ExportError

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

_CHILD = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder, io_path, out_path, device = sys.argv[1:5]
inputs = load_file(io_path, device=device)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True).to(device).eval()
with torch.no_grad():
    logits = model(inputs["input_ids"], logits_to_keep=inputs["positions"]).logits[0].float().cpu()
assert "yarnkit" not in sys.modules, "yarnkit was imported while loading the export"
tensors, scaling = {"logits": logits.contiguous()}, {}
rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "config")]
for i, module in enumerate(rotary):
    for name, buffer in module.named_buffers():
        if name.endswith("inv_freq") and not name.startswith("original"):
            tensors[f"{i}.{name}"] = buffer.detach().cpu().contiguous()
    scaling.update({f"{i}.{k}": float(v) for k, v in vars(module).items() if k.endswith("attention_scaling")})
print("STOCK " + json.dumps({"rope_parameters": model.config.rope_parameters, "attention_scaling": scaling}))
save_file(tensors, out_path)
"""


def rotary_state(model) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each rotary module's inv_freq buffers and attention scalings, named as the verification child names them."""
    from yarnkit.patch import rotary_modules

    buffers, scaling = {}, {}
    for i, (_, _, module) in enumerate(rotary_modules(model)):
        buffers.update({f"{i}.{name}": buffer for name, buffer in module.named_buffers()
                        if name.endswith("inv_freq") and not name.startswith("original")})
        scaling.update({f"{i}.{k}": float(v) for k, v in vars(module).items() if k.endswith("attention_scaling")})
    return buffers, scaling


def rope_mismatches(ours: dict, theirs: dict, prefix: str = "rope_parameters") -> list[str]:
    """Every key of `ours` (a rope_parameters dict, flat or per layer type) that `theirs` reads differently."""
    wrong = []
    for key, value in ours.items():
        other = theirs.get(key) if isinstance(theirs, dict) else None
        if isinstance(value, dict):
            wrong += rope_mismatches(value, other or {}, f"{prefix}.{key}")
        elif not (other == value or isinstance(value, float) and isinstance(other, (int, float))
                  and math.isclose(other, value, rel_tol=1e-9)):
            wrong.append(f"{prefix}.{key}={other!r} (the model has {value!r})")
    return wrong


def _check_stock_rope(model, stock: dict, tensors: dict) -> list[str]:
    """How the RoPE stock transformers built differs from the in-memory model's (empty: identical)."""
    wrong = rope_mismatches(model.config.rope_parameters, stock["rope_parameters"])
    buffers, scaling = rotary_state(model)
    for name, ours in buffers.items():
        theirs = tensors.get(name)
        if theirs is None or theirs.dtype != torch.float32 or ours.dtype != torch.float32:
            wrong.append(f"rotary {name}: stock {None if theirs is None else theirs.dtype}, in memory {ours.dtype} "
                         "(must be float32 on both sides)")
        elif not torch.allclose(theirs.double(), ours.detach().cpu().double(), rtol=1e-6, atol=0):
            wrong.append(f"rotary {name} differs (max relative {((theirs - ours.cpu()) / ours.cpu()).abs().max():.3g})")
    for name, ours in scaling.items():
        if not math.isclose(stock["attention_scaling"].get(name, float("nan")), ours, rel_tol=1e-9):
            wrong.append(f"attention scaling {name}: stock {stock['attention_scaling'].get(name)}, in memory {ours}")
    return wrong


def prompt_ids(tokenizer, n_tokens: int, vocab_size: int) -> torch.Tensor:
    """`[1, n_tokens]` ids from the bundled PG-19 book (repeated if short), kept below `vocab_size`."""
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    text = read_text(sample_path("eval"))[: n_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return torch.tensor([ids[:n_tokens]]).clamp_(max=vocab_size - 1)


def compared_positions(n_tokens: int, stride: int = 16, tail: int = 128) -> torch.Tensor:
    return torch.tensor(sorted(set(range(0, n_tokens, stride)) | set(range(max(0, n_tokens - tail), n_tokens))))


def max_relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.double(), other.double()
    return float((reference - other).abs().max() / reference.abs().max().clamp_min(1e-12))


def verify_hf(folder: Path, model, input_ids: torch.Tensor, timeout_s: int = 1800) -> dict:
    """Logit parity between `model` and `folder` loaded in a clean subprocess on the model's device. Raises
    ExportError above tolerance."""
    from safetensors.torch import load_file, save_file

    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    positions = compared_positions(input_ids.shape[1])
    with torch.no_grad():
        reference = model(input_ids.to(device), logits_to_keep=positions.to(device)).logits[0].float().cpu()
    with tempfile.TemporaryDirectory(prefix="yarnkit-verify-") as scratch:
        io_path, out_path = Path(scratch) / "inputs.safetensors", Path(scratch) / "logits.safetensors"
        save_file({"input_ids": input_ids.contiguous(), "positions": positions}, io_path)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(folder), str(io_path), str(out_path),
                                   str(device)],
                                  capture_output=True, text=True, timeout=timeout_s, cwd=scratch, env=env)
        except subprocess.TimeoutExpired as error:
            raise ExportError(f"reloading the export took over {timeout_s} s; pass a smaller --verify-tokens") from error
        if done.returncode != 0:
            raise ExportError(f"plain transformers could not load the export {folder}:\n{done.stderr[-3000:]}")
        tensors = load_file(out_path)
    stock = json.loads(next(line[6:] for line in done.stdout.splitlines() if line.startswith("STOCK ")))
    wrong = _check_stock_rope(model, stock, tensors)
    if wrong:
        raise ExportError("plain transformers builds a different RoPE from the export than the trained model has: "
                          + "; ".join(wrong[:4]), "this is a yarnkit export bug; report it with the config.json")
    difference = max_relative_difference(reference, tensors["logits"])
    tolerance = TOLERANCE[dtype]
    result = {"loader": "transformers (fresh subprocess, yarnkit not imported)", "dtype": str(dtype).replace("torch.", ""),
              "prompt_tokens": int(input_ids.shape[1]), "compared_positions": len(positions),
              "max_relative_difference": difference, "tolerance": tolerance, "passed": difference <= tolerance,
              "stock_rope_parameters": stock["rope_parameters"], "stock_attention_scaling": stock["attention_scaling"],
              "inv_freq_dtype": "float32"}
    if not result["passed"]:
        raise ExportError(f"exported model disagrees with the trained one: max relative logit difference {difference:.3g} "
                          f"> {tolerance:g} on a {input_ids.shape[1]}-token prompt; the exported RoPE config is wrong")
    return result


def verify_config(folder: Path, tokenizer) -> dict:
    """vLLM's view of the YaRN keys and the sink token's presence. Raises ExportError on errors."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer_max = tokenizer.model_max_length if tokenizer.model_max_length < 2**40 else None
    errors, warnings = rope_keys.check_vllm_rope(config, tokenizer_max)
    sink = config.get("yarnkit_sink_token_id")
    if sink is not None and not 0 <= sink < len(tokenizer):
        errors.append(f"yarnkit_sink_token_id={sink} is not in the exported tokenizer (size {len(tokenizer)})")
    if errors:
        raise ExportError("exported config.json is not loadable as intended:\n  " + "\n  ".join(errors))
    return {"vllm_max_model_len": rope_keys.vllm_max_model_len(config, True, tokenizer_max), "warnings": warnings,
            "sink_token_id": sink}


GGUF_TOLERANCE = 1e-4  # same weights on both sides (see verify_gguf): only float32 summation order may differ


def verify_gguf(gguf_path: Path, model, input_ids: torch.Tensor, gguf_type: str) -> dict:
    """The RoPE llama.cpp builds from the GGUF's metadata (`gguf.llama_cpp_rope`) must be the model's: same
    inverse frequencies and attention factor (1e-6), context = max_position_embeddings. Then the GGUF is read back
    with transformers' GGUF loader, given that RoPE (the loader ignores Llama's rope-scaling keys), and its float32
    logits are compared with a copy of `model` whose weights went through the same quantize/dequantize round
    trip: the check isolates names, Q/K layout, hyper-parameters and RoPE from the precision the user chose. The
    quantization error against `model` itself is reported too."""
    from transformers import AutoModelForCausalLM

    from yarnkit.export.gguf import llama_cpp_rope, stored_values
    from yarnkit.patch import rotary_module

    rope = llama_cpp_rope(gguf_path)
    rotary = rotary_module(model)
    ours = rotary.inv_freq.detach().cpu().double()
    wrong = []
    if rope["inv_freq"].shape != ours.shape or not torch.allclose(rope["inv_freq"], ours, rtol=1e-6, atol=0):
        wrong.append("inverse frequencies")
    if not math.isclose(rope["attention_factor"], rotary.attention_scaling, rel_tol=1e-6):
        wrong.append(f"attention factor {rope['attention_factor']:.6g} (the model's is {rotary.attention_scaling:.6g})")
    if rope["context_length"] != model.config.max_position_embeddings:
        wrong.append(f"context {rope['context_length']} (the model's is {model.config.max_position_embeddings})")
    if wrong:
        raise ExportError(f"the RoPE llama.cpp builds from {gguf_path.name} ({rope['keys']}) is not the model's: "
                          + ", ".join(wrong), "this is a yarnkit export bug; report it with the model's config.json")
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    loaded_rotary = rotary_module(loaded)
    with torch.no_grad():  # llama.cpp's RoPE, as read from the metadata, in place of the loader's plain one
        loaded_rotary.inv_freq.copy_(rope["inv_freq"].float())
        loaded_rotary.original_inv_freq = loaded_rotary.inv_freq.clone()
    loaded_rotary.attention_scaling = rope["attention_factor"]
    positions = compared_positions(input_ids.shape[1])
    device = next(model.parameters()).device
    reference_model = copy.deepcopy(model).float()
    loaded, input_ids, positions = loaded.to(device), input_ids.to(device), positions.to(device)
    with torch.no_grad():
        for weight in reference_model.parameters():
            if weight.ndim > 1:
                weight.copy_(torch.from_numpy(stored_values(weight.detach().cpu().numpy(), gguf_type)))
        reference = reference_model(input_ids, logits_to_keep=positions).logits[0].cpu()
        other = loaded(input_ids, logits_to_keep=positions).logits[0].cpu()
        trained = model(input_ids, logits_to_keep=positions).logits[0].float().cpu()
    difference = max_relative_difference(reference, other)
    tolerance = GGUF_TOLERANCE
    result = {"loader": "transformers GGUF loader + RoPE from GGUF metadata", "gguf_type": gguf_type,
              "rope_from_metadata": {**rope["keys"], "attention_factor": rope["attention_factor"]},
              "context_length": rope["context_length"], "prompt_tokens": int(input_ids.shape[1]),
              "max_relative_difference": difference, "tolerance": tolerance, "passed": difference <= tolerance,
              "quantization_error": max_relative_difference(trained, other)}
    if not result["passed"]:
        raise ExportError(f"GGUF logits disagree with the model (same {gguf_type} weights): max relative difference "
                          f"{difference:.3g} > {tolerance:g}; the GGUF layout or metadata is wrong")
    return result
