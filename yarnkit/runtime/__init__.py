"""yarnkit's streaming runtime: attention sinks + rolling KV cache, chat and an OpenAI-compatible server.

`cache.py` (the small cache object), `engine.py` (chunked prefill / decode with eviction, SirLLM retention),
`policy.py` (the eval suite's `SinkPolicy`), `compress.py` (LLMLingua-style prompt compression),
`chat.py` (`yarnkit chat`), `serve.py` (`yarnkit serve`). See docs/runtime.md.
"""
