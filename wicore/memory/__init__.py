"""Tiered memory: replacement policies, storage formats and access traces."""
