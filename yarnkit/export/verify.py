"""Check an exported folder the way its users will load it.

- `verify_hf(dir, model, input_ids)`: a fresh `python -I` subprocess loads `dir` with plain transformers (it
  asserts `yarnkit` was never imported there), runs `input_ids`, and its logits are compared with the in-memory
  model's. The metric is max |Δlogit| / max |logit| over the compared positions (every `stride`-th one plus the
  last 128, so positions past the original context are always in).
- `verify_config(dir)`: vLLM's reading of the YaRN keys (`rope_keys.check_vllm_rope`) and the sink token.
- `prompt_ids(tokenizer, n)`: a deterministic long prompt: the bundled PG-19 book, tokenized.

Tolerances (`TOLERANCE`) are per dtype: fp32 1e-4 (only summation order differs), bf16/fp16 2e-2. The GGUF check
compares against the model with its weights rounded as the GGUF stores them, so it holds 1e-4 for every type.
Tested by tests/test_export.py.
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
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder, io_path, out_path, device = sys.argv[1:5]
inputs = load_file(io_path, device=device)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True).to(device).eval()
with torch.no_grad():
    logits = model(inputs["input_ids"], logits_to_keep=inputs["positions"]).logits[0].float().cpu()
assert "yarnkit" not in sys.modules, "yarnkit was imported while loading the export"
rope = getattr(model.config, "rope_parameters", None)
print("ROPE", rope)
save_file({"logits": logits.contiguous()}, out_path)
"""


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
        loaded = load_file(out_path)["logits"]
    difference = max_relative_difference(reference, loaded)
    tolerance = TOLERANCE[dtype]
    result = {"loader": "transformers (fresh subprocess, yarnkit not imported)", "dtype": str(dtype).replace("torch.", ""),
              "prompt_tokens": int(input_ids.shape[1]), "compared_positions": len(positions),
              "max_relative_difference": difference, "tolerance": tolerance, "passed": difference <= tolerance}
    if not result["passed"]:
        raise ExportError(f"exported model disagrees with the trained one: max relative logit difference {difference:.3g} "
                          f"> {tolerance:g} on a {input_ids.shape[1]}-token prompt; the exported RoPE config is wrong")
    return result


def verify_config(folder: Path, tokenizer) -> dict:
    """vLLM's view of the YaRN keys and the sink token's presence. Raises ExportError on errors."""
    config = json.loads((folder / "config.json").read_text())
    errors, warnings = rope_keys.check_vllm_rope(config)
    sink = config.get("yarnkit_sink_token_id")
    if sink is not None and not 0 <= sink < len(tokenizer):
        errors.append(f"yarnkit_sink_token_id={sink} is not in the exported tokenizer (size {len(tokenizer)})")
    if errors:
        raise ExportError("exported config.json is not loadable as intended:\n  " + "\n  ".join(errors))
    return {"vllm_max_model_len": rope_keys.vllm_max_model_len(config), "warnings": warnings,
            "sink_token_id": sink}


GGUF_TOLERANCE = 1e-4  # same weights on both sides (see verify_gguf): only float32 summation order may differ


def verify_gguf(gguf_path: Path, model, input_ids: torch.Tensor, gguf_type: str) -> dict:
    """Read the GGUF back with transformers' GGUF loader, give it the RoPE the GGUF metadata describes (that
    loader ignores Llama's rope-scaling keys), and compare its float32 logits with a copy of `model` whose weights
    went through the same quantize/dequantize round trip: the check isolates names, Q/K layout, hyper-parameters
    and RoPE from the precision the user chose. The quantization error against `model` itself is reported too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from yarnkit.export.gguf import rope_parameters_from_gguf, stored_values

    rope, context = rope_parameters_from_gguf(gguf_path)
    expected = {k: v for k, v in model.config.rope_parameters.items()
                if k in ("rope_type", "rope_theta", "factor", "original_max_position_embeddings")}
    mismatched = {k: (rope.get(k), v) for k, v in expected.items()
                  if not (rope.get(k) == v or isinstance(v, float) and math.isclose(rope.get(k), v, rel_tol=1e-6))}
    if mismatched or context != model.config.max_position_embeddings:
        raise ExportError(f"GGUF RoPE metadata {rope} (context {context}) does not match the model: {mismatched}")
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.rope_parameters = rope
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32).eval()
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
              "rope_from_metadata": rope, "context_length": context, "prompt_tokens": int(input_ids.shape[1]),
              "max_relative_difference": difference, "tolerance": tolerance, "passed": difference <= tolerance,
              "quantization_error": max_relative_difference(trained, other)}
    if not result["passed"]:
        raise ExportError(f"GGUF logits disagree with the model (same {gguf_type} weights): max relative difference "
                          f"{difference:.3g} > {tolerance:g}; the GGUF layout or metadata is wrong")
    return result
