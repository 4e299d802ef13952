"""Standalone prefill worker: serves prefill requests and publishes KV block manifests (built in a later issue)."""
