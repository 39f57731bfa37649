"""moec's passes. Importing this package registers every pass by its kebab-case name."""

from passes import canonicalize, cleanup, fold_weights, fuse_moe, kv_cache, quantize, shard

__all__ = ["canonicalize", "cleanup", "fold_weights", "fuse_moe", "kv_cache", "quantize", "shard"]
