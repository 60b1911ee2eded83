"""Shared network pieces (losses, queues, momentum, heads, backbones, warping); imports neither Ray nor data."""
