"""yarnkit's streaming runtime: attention sinks + rolling KV cache, chat and an OpenAI-compatible server.

`options.py` (every streaming setting: the flags, `StreamOptions`, the decode resolver, the model loader),
`cache.py` (the growing sink cache and the sinks-and-window eviction rule), `static.py` (pooled fixed-shape rows,
the batched CUDA-graph step), `decoders.py` (one decoder interface over both), `engine.py` (chunked prefill /
decode with eviction, SirLLM, batched decode across sessions), `compress.py` (LLMLingua-style prompt
compression), `conversation.py` (chat template, turns), `chat.py` (`yarnkit chat`), `scheduler.py` + `api.py` +
`serve.py` (`yarnkit serve`). The eval suite's `SinkPolicy` lives in yarnkit/eval/stream.py; the runtime's
benchmark in yarnkit/bench/streaming.py. See docs/runtime.md.
"""
