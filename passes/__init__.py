"""moec's passes. Importing this package registers every pass by its kebab-case name."""

from passes import canonicalize, cleanup, fold_weights, fuse_moe, kv_cache, quantize, shard
from passes import fuse_norm, fuse_qkv, fuse_rope, logits_for
from passes import calibrate, quantize_fp8

__all__ = [
    "canonicalize", "cleanup", "fold_weights", "fuse_moe", "fuse_norm", "fuse_qkv", "fuse_rope", "kv_cache",
    "logits_for", "quantize", "shard", "calibrate", "quantize_fp8",
]
