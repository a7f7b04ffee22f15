"""Segmenting collections: the engine, video tracking, post-processing, the per-image runs and shards."""
