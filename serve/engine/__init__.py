"""The inference engine (no Ray inside): continuous batching, chunked prefill, per-request sampling, streaming.

``engine.LLMEngine`` is the synchronous core (``add_request`` / ``step`` / ``abort`` / ``generate``);
``async_engine.AsyncEngine`` runs it in one background thread behind an asyncio streaming API. Both serve
our MoE student and dense LLaMA/Qwen2/Mistral HF models through the student's own decoder and KV cache.
``types`` (requests, outputs, errors) imports without torch; ``factory.load_engine`` builds an engine from
the ``serve:`` section (ours or vLLM); ``teacher.EngineTeacher`` is the engine as a teacher backend.
"""
