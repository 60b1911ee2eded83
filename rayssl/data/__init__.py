"""Streaming crops from Zarr stores through Ray Data: plans, chunk-level reads, view building."""
