"""yarnkit's streaming runtime: attention sinks + rolling KV cache, chat and an OpenAI-compatible server.

`cache.py` (the growing sink cache), `static.py` (pooled fixed-shape rows, the batched CUDA-graph step),
`decoders.py` (one decoder interface over both), `engine.py` (chunked prefill / decode with eviction, SirLLM,
batched decode across sessions), `compress.py` (LLMLingua-style prompt compression), `conversation.py` (chat
template, turns), `chat.py` (`yarnkit chat`), `scheduler.py` + `api.py` + `serve.py` (`yarnkit serve`),
`bench.py` (benchmark timing). The eval suite's `SinkPolicy` lives in yarnkit/eval/stream.py. See docs/runtime.md.
"""
