"""The rewrite rules of the `shard` pass (`passes/shard.py`), one module per region kind.

`layout.py` (sizes, a rank's place, the per-rank rewriter), `attention.py` (heads), `moe.py` (experts),
`vocabulary.py` (embedding and lm_head), `pipeline.py` (stages).
"""
