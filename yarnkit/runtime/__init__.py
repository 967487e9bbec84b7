"""yarnkit's streaming runtime: attention sinks + rolling KV cache, chat and an OpenAI-compatible server.

`options.py` (every streaming setting: the flags, `StreamOptions`, the decode resolver, the model loader),
`cache.py` (the growing sink cache and the sinks-and-window eviction rule), `static.py` (pooled fixed-shape rows,
the batched CUDA-graph step), `fused.py` (q/k/v and gate/up projections as one matmul each, RMSNorms as
`torch.rms_norm`), `decoders.py` (one decoder interface over both), `engine.py` (chunked prefill / decode with
eviction, SirLLM, batched decode across sessions), `compress.py` (LLMLingua-style prompt
compression), `conversation.py` (chat template, turns), `chat.py` (`yarnkit chat`); `yarnkit serve` is
`sessions.py` (which conversation, one cache row each, serves a request), `admission.py` (the queue in front of
the rows), `scheduler.py` (the loop: batched decode, interleaved prefill), `api.py` (the OpenAI surface) and
`serve.py` (HTTP). The eval suite's `SinkPolicy` lives in yarnkit/eval/stream.py; the runtime's benchmarks in
yarnkit/bench/ (streaming.py, lone_session.py). See docs/runtime.md.
"""
