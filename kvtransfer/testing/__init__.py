"""Harnesses for kvtransfer's tests, benchmarks and demos (as ``numpy.testing`` is
numpy's): not the library's API, and nothing in the library imports them.

- :mod:`.target`: ``python -m kvtransfer.testing.target``, a process that registers
  seeded bytes and serves them (the engine's "other process").
- :mod:`.synthetic`: ``python -m kvtransfer.testing.synthetic``, a prefill process that
  serves a known KV pattern over the control plane.
- :mod:`.children`: start such a child and read its JSON line; stop it, bounded.
- :mod:`.openai_client`: a client of an OpenAI-compatible HTTP server (JSON and
  server-sent events), every call bounded by a timeout.
- :mod:`.vllm_serve`: ``vllm serve`` as a child process (tests and ``bench/vllm_pd.py``).
"""
