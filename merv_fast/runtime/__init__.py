"""How the frozen encoders run: concurrency modes (encoders.py) and the pooled-feature cache (feature_cache.py)."""
