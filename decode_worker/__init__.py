"""Standalone decode worker: pulls KV blocks from prefill workers and decodes (built in a later issue)."""
