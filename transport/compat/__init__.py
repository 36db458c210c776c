"""Faces of the transport that speak another project's API (vllm.py: vLLM's shm_broadcast.MessageQueue)."""
