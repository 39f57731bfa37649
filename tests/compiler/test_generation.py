"""`CompiledModel.generate` (compiler/generation.py and compiler/sampling.py over the torch runtime's KV-cache
sessions): greedy tokens equal Hugging Face's own cached `generate`, batches equal their prompts run alone, every
decode step's logits equal a full recompute, sampling follows Hugging Face's warpers, and bad arguments are one clear
error before anything runs."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch

from backends.torch.runtime import TorchExecutable
from compiler.api import CompiledModel
from compiler.errors import MoecError
from compiler.generation import PREFILL_LOGITS_BUDGET, generate, prefill_chunk_size
from compiler.sampling import Sampling, choose_tokens, process_logits
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.ir import Program
from tests.models import TINY_CONFIGS, TinyConfig, hf_model, input_ids, max_rel_err, traced
from tests.passes.test_canonicalize import compiled as pipeline_program
from tests.passes.test_kv_cache import cached

FUSED = "canonicalize,fuse-moe,dce"
# GQA top-2, MHA top-1 with one layer, GQA top-3 with a sliding window of 3 over 3 layers (the configs the kv-cache
# pass tests trace too: one trace each per session).
CONFIGS = [TINY_CONFIGS[0], TINY_CONFIGS[1], TINY_CONFIGS[2]]


def fused(config: TinyConfig) -> Program:
    return pipeline_program(config, FUSED)  # shared with the pass tests: one trace and one pipeline per session


@lru_cache(maxsize=None)
def compiled(config: TinyConfig, kv_cache: str = "kv-cache") -> CompiledModel:
    """The default pipeline's model (`kv_cache=""`: the same without the pass, which recomputes every step)."""
    if kv_cache == "kv-cache":
        program, history = cached(config), []
    else:
        result = run_pipeline(fused(config), parse_pipeline(f"{kv_cache},dce" if kv_cache else ""))
        program, history = result.program, result.history
    return CompiledModel(program, traced(config, torch.float32), history)


@torch.no_grad()
def hf_generate(config: TinyConfig, ids: torch.Tensor, **options: Any) -> torch.Tensor:
    """Hugging Face's `generate` with its own dynamic KV cache; EOS off unless asked for."""
    options.setdefault("eos_token_id", None)
    options.setdefault("pad_token_id", 0)
    options.setdefault("do_sample", False)
    return hf_model(config).generate(ids, **options)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_greedy_tokens_equal_hugging_face(config: TinyConfig) -> None:
    ids = input_ids(config, 2, 6)
    tokens = compiled(config).generate(ids, 32)
    assert tokens.shape == (2, 6 + 32)
    assert torch.equal(tokens, hf_generate(config, ids, max_new_tokens=32))


def test_left_padded_batch_equals_hugging_face_and_each_prompt_alone() -> None:
    config = TINY_CONFIGS[2]  # the sliding window (3) is shorter than the prompts
    model = compiled(config)
    prompts = [input_ids(config, 1, n, seed=n)[0].tolist() for n in (5, 2, 8)]
    alone = [model.generate([prompt], 12)[0] for prompt in prompts]
    assert model.generate(prompts, 12) == alone
    assert [len(row) for row in alone] == [5 + 12, 2 + 12, 8 + 12]
    padded = torch.tensor([[0] * (8 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (8 - len(p)) + [1] * len(p) for p in prompts])
    tokens = model.generate(padded, 12, attention_mask=mask)
    assert torch.equal(tokens, hf_generate(config, padded, attention_mask=mask, max_new_tokens=12))
    assert [tokens[b, 8:].tolist() for b in range(3)] == [row[len(p) :] for row, p in zip(alone, prompts)]


def test_a_prefill_in_chunks_generates_the_same_tokens() -> None:
    config = TINY_CONFIGS[2]
    executable = compiled(config).executable()
    prompts = [input_ids(config, 1, n, seed=n)[0].tolist() for n in (7, 3, 5)]
    whole = generate(executable, prompts, 6)
    assert generate(executable, prompts, 6, prefill_chunk=2) == whole  # chunks [0,2) [2,4) [4,6) [6,7)
    assert generate(executable, prompts, 6, prefill_chunk=1) == whole  # every prompt position is a decode step
    # By default one step's float32 logits stay within the budget (64 prompts over Mixtral's 32000 tokens).
    chunk = prefill_chunk_size(64, 32000)
    assert chunk * 64 * 32000 * 4 <= PREFILL_LOGITS_BUDGET < (chunk + 1) * 64 * 32000 * 4


def test_every_decode_step_equals_a_full_recompute() -> None:
    config = TINY_CONFIGS[0]
    reference = TorchExecutable(fused(config))
    session = compiled(config).executable().new_session(2)
    prompts = input_ids(config, 2, 7)
    lengths = torch.tensor([7, 4])  # sequence 1 is a 4-token prompt right-padded to 7
    sequences = [prompts[0].tolist(), prompts[1, :4].tolist()]
    logits = session.step(prompts, torch.zeros(2, dtype=torch.int64))
    last = logits[torch.arange(2), lengths - 1]
    worst = 0.0
    for _ in range(10):
        expected = torch.stack([reference(torch.tensor([seq]))[0, -1] for seq in sequences])
        worst = max(worst, max_rel_err(last, expected))
        tokens = last.argmax(-1)
        for seq, token in zip(sequences, tokens.tolist()):
            seq.append(token)
        last = session.step(tokens[:, None], lengths)[:, -1]
        lengths = lengths + 1
    assert worst <= 1e-5


def test_sessions_reuse_the_caches_of_their_batch_size() -> None:
    executable = TorchExecutable(compiled(TINY_CONFIGS[1]).program)
    first, second, other = executable.new_session(2), executable.new_session(2), executable.new_session(3)
    assert all(a is b for a, b in zip(first.caches, second.caches))  # allocated once per batch size
    assert [tuple(c.shape) for c in other.caches] == [(3, 4, 128, 8)] * 2  # 1 layer: key and value
    assert sorted(executable._cache_pools) == [2, 3]
    ids = input_ids(TINY_CONFIGS[1], 2, 5)
    with pytest.raises(MoecError, match=r"^session of 2 sequences got input_ids \[3, 5\] and cache_position \[2\]"):
        first.step(torch.cat([ids, ids[:1]]), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="^a program with KV caches is called with input_ids only"):
        executable(ids, torch.zeros(2, dtype=torch.int64))
    assert executable._cache_pools[2][0].shape[2] == 128  # the stateless call below allocates its own short caches
    assert max_rel_err(executable(ids), TorchExecutable(fused(TINY_CONFIGS[1]))(ids)) <= 1e-5


def test_a_program_without_kv_cache_generates_the_same_tokens() -> None:
    config = TINY_CONFIGS[1]
    ids = input_ids(config, 2, 5)
    recompute, cached = compiled(config, ""), compiled(config)
    assert recompute.program.cache_nodes() == [] and cached.program.cache_nodes() != []
    assert torch.equal(recompute.generate(ids, 8), cached.generate(ids, 8))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert recompute.generate(prompts, 6, do_sample=True, seed=3) == cached.generate(prompts, 6, do_sample=True, seed=3)


def test_a_backend_without_sessions_generates_through_its_logits() -> None:
    config = TINY_CONFIGS[1]
    cached = compiled(config)
    logits_only = TorchExecutable(fused(config))
    # What a TensorRT executable offers: input ids in, logits out, nothing else.
    plain = CompiledModel(cached.program, cached.traced, cached.history, _executable=lambda ids: logits_only(ids))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert plain.generate(prompts, 6) == cached.generate(prompts, 6)


def test_eos_ends_each_sequence_like_hugging_face() -> None:
    config = TINY_CONFIGS[0]
    model = compiled(config)
    ids = input_ids(config, 3, 4)
    free = model.generate(ids, 10)
    eos = int(free[0, 4 + 2])  # sequence 0's third token: it ends there, the others when (if) they emit it
    tokens = model.generate(ids, 10, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(tokens, hf_generate(config, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=5))
    assert tokens[0, 4:7].tolist() == free[0, 4:7].tolist() and set(tokens[0, 7:].tolist()) <= {5}
    as_lists = model.generate(ids.tolist(), 10, eos_token_id=eos)
    assert as_lists[0] == free[0, :7].tolist()  # the prompt, then up to and including its EOS


def test_process_logits_equals_hugging_face_warpers() -> None:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = logits[0, 10]  # ties at the k-th value are kept by both
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 12, 1.0), (1.3, 0, 0.9), (0.5, 20, 0.6)]:
        expected = logits.clone()
        if temperature != 1.0:
            expected = TemperatureLogitsWarper(temperature)(None, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        actual = process_logits(logits, temperature, top_k, top_p)
        assert torch.equal(actual.isinf(), expected.isinf()), (temperature, top_k, top_p)
        assert torch.allclose(actual[~actual.isinf()], expected[~expected.isinf()])


def test_top_k_and_top_p_keep_what_they_promise() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda **kw: (~process_logits(logits, **kw).isinf())[0].tolist()  # noqa: E731
    assert kept(top_p=0.75) == [True, True, False, False]  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert kept(top_p=0.3) == [True, False, False, False]  # the most probable token is always kept
    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_k=200) == [True] * 4  # more than the vocabulary keeps everything
    hot = torch.softmax(process_logits(logits, temperature=2.0), dim=-1)
    assert torch.allclose(hot, torch.softmax(logits / 2.0, dim=-1))  # a higher temperature flattens


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    config = TINY_CONFIGS[0]
    model = compiled(config)
    ids = input_ids(config, 2, 5)
    options = dict(do_sample=True, temperature=1.5, top_k=0, top_p=0.95)  # top_k=0: Hugging Face's default is 50
    first = model.generate(ids, 16, seed=7, **options)
    assert torch.equal(first, model.generate(ids, 16, seed=7, **options))
    assert torch.equal(model.generate(ids, 16, do_sample=True, top_k=1, seed=1), model.generate(ids, 16))
    torch.manual_seed(7)  # Hugging Face samples from the global generator; ours is a fresh one seeded alike
    assert torch.equal(first, hf_generate(config, ids, max_new_tokens=16, **options))


def test_choose_tokens_draws_from_the_processed_distribution() -> None:
    logits = torch.tensor([[0.0, 0.0, 5.0, -1.0]])
    sampling = Sampling(do_sample=True, top_k=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([choose_tokens(logits.expand(64, -1), sampling, generator) for _ in range(8)])
    # top_k=2 keeps token 2 and one of the tied zeros (both, as ties are kept): token 3 is never drawn.
    assert set(draws.tolist()) <= {0, 1, 2} and 2 in draws.tolist()
    assert choose_tokens(logits, Sampling(), None).tolist() == [2]


class _Recorder:
    """Hugging Face's streamer protocol: `put` the prompt, then each step's tokens; `end` once."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_the_prompt_then_each_step() -> None:
    config = TINY_CONFIGS[0]
    ids = input_ids(config, 2, 4)
    streamer = _Recorder()
    tokens = compiled(config).generate(ids, 5, streamer=streamer)
    assert streamer.ended == 1 and len(streamer.puts) == 1 + 5
    assert torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), tokens[:, 4:])


class _ScriptedSession:
    """Logits whose argmax is token (i + 1) % vocab at its i-th step (the prefill is step 0); records the order of
    steps and host reads."""

    def __init__(self, events: list[str], vocab: int) -> None:
        self.events, self.vocab, self.steps = events, vocab, 0

    def step(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        self.events.append(f"step {self.steps}")
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, (self.steps + 1) % self.vocab] = 1.0
        self.steps += 1
        return logits


class _ScriptedDecoder:
    vocab_size = 8
    device = torch.device("cpu")
    max_seq = 64

    def __init__(self) -> None:
        self.events: list[str] = []

    def new_session(self, batch: int) -> _ScriptedSession:
        return _ScriptedSession(self.events, self.vocab_size)


def test_the_next_step_is_enqueued_before_the_host_reads_a_token() -> None:
    decoder = _ScriptedDecoder()

    class Streamer(_Recorder):
        def put(self, value: torch.Tensor) -> None:
            decoder.events.append(f"put {value.tolist()}")

    # step 0 is the prefill (argmax 1); decode step i returns argmax i + 1; token 4 is EOS
    tokens = generate(decoder, [[0, 0]], 10, eos_token_id=4, streamer=Streamer())
    assert tokens == [[0, 0, 1, 2, 3, 4]]
    # Each step's tokens reach the host (streamer, EOS check) only after the next step is enqueued; the step after
    # the EOS token (step 4) is enqueued and discarded.
    assert decoder.events == ["put [[0, 0]]", "step 0", "step 1", "put [1]", "step 2", "put [2]", "step 3",
                              "put [3]", "step 4", "put [4]"]


class _Spy:
    """A decoder that counts sessions, to show that bad arguments fail before anything runs."""

    vocab_size = 96
    device = torch.device("cpu")
    max_seq = 16
    sessions = 0

    def new_session(self, batch: int) -> Any:
        self.sessions += 1
        raise AssertionError("generate started on bad arguments")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(input_ids=[[1] * 10], max_new_tokens=7),
         "the longest prompt (10 tokens) + max_new_tokens (7) = 17 exceeds the KV cache's max_seq 16; "
         "compile with kv-cache{max_seq=17}"),
        (dict(input_ids=[]), "input_ids is a batch of zero prompts"),
        (dict(input_ids=torch.zeros((0, 3), dtype=torch.int64)), "input_ids is a batch of zero prompts"),
        (dict(input_ids=[[1, 2], []]), "prompt 1 has no tokens"),
        (dict(top_p=0.0), "top_p must lie in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must lie in (0, 1], got 1.5"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(temperature=0.0, do_sample=True), "temperature=0 cannot sample; use do_sample=False for greedy decoding"),
        (dict(eos_token_id=96), "eos_token_id=96 is outside the vocabulary [0, 96)"),
        (dict(eos_token_id=[2, -1]), "eos_token_id=[2, -1] is outside the vocabulary [0, 96)"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"),
        (dict(top_k=-2), "top_k must be >= 0, got -2"),
        (dict(prefill_chunk=0), "prefill_chunk must be >= 1, got 0"),
        (dict(input_ids=[[1, 200]]), "prompt 0 has token ids outside the vocabulary [0, 96)"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])),
         "input_ids must be an integer tensor [batch, seq], got torch.float32 [1, 2]"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]])),
         "attention_mask must be left padding (zeros, then ones to the end of each row)"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1]])),
         "attention_mask must be a tensor shaped like input_ids [1, 2], got [1, 1]"),
        (dict(attention_mask=torch.tensor([[1]])),
         "attention_mask applies to a tensor of input_ids, not to a list of prompts"),
    ],
)
def test_bad_arguments_are_one_error_before_anything_runs(arguments: dict[str, Any], message: str) -> None:
    spy = _Spy()
    arguments = {"input_ids": [[1, 2, 3]], "max_new_tokens": 4, **arguments}
    with pytest.raises(MoecError) as error:
        generate(spy, **arguments)
    assert str(error.value) == message
    assert spy.sessions == 0


def test_compiled_model_checks_its_own_cache_length() -> None:
    config = TINY_CONFIGS[1]
    model = compiled(config, "kv-cache{max_seq=12}")
    assert model.generate([[1, 2, 3, 4]], 8) == model.generate([[1, 2, 3, 4]], 8)  # 4 + 8 fits exactly
    with pytest.raises(MoecError, match=r"^the longest prompt \(4 tokens\) \+ max_new_tokens \(9\) = 13 exceeds"):
        model.generate([[1, 2, 3, 4]], 9)


def test_generate_text_needs_a_tokenizer_and_uses_it() -> None:
    config = TINY_CONFIGS[0]
    model = compiled(config)
    with pytest.raises(MoecError, match="^this model has no tokenizer"):
        model.generate_text(["hello"], 3)

    class Letters:
        """A tokenizer of lowercase letters: a=0 ... z=25."""

        eos_token_id = None

        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) - ord("a") for c in text]}

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return " ".join(str(i) for i in ids)

    with_tokenizer = CompiledModel(model.program, model.traced, model.history, tokenizer=Letters())
    text = with_tokenizer.generate_text(["abc", "hello"], 4)
    expected = model.generate([[0, 1, 2], [7, 4, 11, 11, 14]], 4)
    assert text == [" ".join(str(i) for i in row[-4:]) for row in expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_steps_equal_eager_steps() -> None:
    import copy

    from compiler.api import compile

    config = TINY_CONFIGS[2]
    # bf16: the moe op then runs its Triton kernel, which (unlike the float32 reference) never syncs with the host.
    program = compile(copy.deepcopy(hf_model(config)).to(torch.bfloat16), device="cuda").program
    eager = TorchExecutable(program, "cuda")
    graphed = TorchExecutable(program, "cuda", cuda_graphs=True)
    for batch, seed in [(3, 1), (1, 2), (3, 3)]:  # buckets 4 and 1; the second batch of 3 replays bucket 4's graph
        ids = input_ids(config, batch, 6, seed=seed).cuda()
        sessions = [eager.new_session(batch), graphed.new_session(batch)]
        start = torch.zeros(batch, dtype=torch.int64, device="cuda")
        logits = [session.step(ids, start)[:, -1].float() for session in sessions]
        position = start + ids.shape[1]
        for step in range(8):
            assert max_rel_err(logits[1], logits[0]) <= 2e-2, (batch, step)
            tokens = logits[0].argmax(-1)[:, None]  # both sessions are fed the same tokens
            logits = [session.step(tokens, position)[:, -1].float() for session in sessions]
            position = position + 1
    assert sorted(graphed._decode_graphs) == [1, 4]
    assert sorted(graphed._cache_pools) == [1, 4] and sorted(eager._cache_pools) == [1, 3]
    before = [cache.data_ptr() for cache in graphed._cache_pools[4]]
    generated = generate(graphed, [[1, 2, 3], [4, 5], [6]], 5)
    assert [len(row) for row in generated] == [8, 7, 6]
    assert [cache.data_ptr() for cache in graphed._cache_pools[4]] == before  # caches allocated once, reused
