"""`yarnkit export`: turn a training run, a checkpoint or an HF model folder into files stock loaders read.

Modules, one responsibility each: `source` (find and check the input), `hf` (load, merge LoRA, write the HF
folder), `rope_keys` (RoPE config keys per loader), `verify` (reload and compare logits), `gguf` (llama.cpp file),
`card` (README.md model card), `hub` (push to the Hugging Face Hub), `cli` (the command and the atomic write).
"""
