"""The torch backend on a CUDA GPU: compiled tiny models against Hugging Face on the same GPU, and CUDA graphs."""

from __future__ import annotations

import copy

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.api import compile
from tests.models import TINY_CONFIGS, hf_model, input_ids, max_rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
def test_compiled_model_on_gpu_matches_hugging_face(dtype: torch.dtype, tolerance: float) -> None:
    config = TINY_CONFIGS[2]
    model = copy.deepcopy(hf_model(config)).to("cuda", dtype)
    compiled = compile(model, device="cuda")
    ids = input_ids(config, 2, 9).cuda()
    with torch.no_grad():
        expected = model(ids).logits
    assert max_rel_err(compiled(ids), expected) <= tolerance


def test_cuda_graph_replay_equals_eager_for_new_inputs() -> None:
    config = TINY_CONFIGS[0]
    model = copy.deepcopy(hf_model(config)).to("cuda", torch.bfloat16)
    # Without kv-cache: the per-shape replay of stateless calls (decode graphs of cached programs: test_generation).
    program = compile(model, passes="canonicalize,fuse-moe,dce", device="cuda").program
    eager = TorchExecutable(program, "cuda")
    graphed = TorchExecutable(program, "cuda", cuda_graphs=True)
    for seed in (1, 2, 3):  # the second and third calls replay the captured graph with new token ids
        ids = input_ids(config, 1, 4, seed=seed).cuda()
        assert torch.equal(graphed(ids), eager(ids))
