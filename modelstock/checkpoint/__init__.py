"""Safetensors over fsspec: strict header parsing, ranged tensor reads, streaming shard writes."""
