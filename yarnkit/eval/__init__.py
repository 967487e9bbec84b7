"""Evaluation suite: perplexity vs length (`ppl`), passkey/needle retrieval grids (`passkey`), streaming
perplexity through KV-cache policies (`stream`), attention sinks (`sinks`), plots and a markdown report. CLI: `yarnkit eval --help`.
"""
