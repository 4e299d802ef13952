"""KV-cache connectors for serving engines.

core: the engine-agnostic producer (KVCacheSource) and consumer (KVCacheSink); vllm: vLLM's
KVConnectorBase_V1 adapter (imports vLLM; load it only inside a vLLM process).
"""
