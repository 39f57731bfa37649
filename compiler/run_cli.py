"""`moec run`: compile, then generate from text or token ids with TensorRT-LLM run.py's flags.

    moec run tiny --input-text "The list" --max-output-len 16
    moec run tiny --input-text "The list" "Return the" --top-k 4 --random-seed 1 --streaming
    moec run tiny-random --input-ids "1 2 3" --max-new-tokens 8
    torchrun --nproc-per-node 2 -m compiler.cli run tiny --passes "canonicalize,fuse-moe,shard{tp=2},kv-cache,dce" ...

run.py's underscore spellings (`--max_output_len`, `--input_text`, `--top_k`, ...) are accepted as aliases.
Sampling follows run.py: greedy unless `--top-k` > 1 or `--top-p` > 0. A driver module: it sits beside
`compiler/cli.py` on the top floor.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

from compiler.errors import MoecError


def add_run_cli(sub: Any, add_source: Any) -> None:
    p = sub.add_parser("run", help="compile and generate (torch backend) from text or token ids")
    add_source(p)
    p.add_argument("--passes", default=None)
    prompts = p.add_argument_group("prompts (exactly one of)")
    prompts.add_argument("--input-text", "--input_text", dest="input_text", nargs="+", metavar="TEXT",
                         help="one or more prompts, generated as one batch (needs a tokenizer)")
    prompts.add_argument("--input-file", "--input_file", dest="input_file", metavar="FILE",
                         help="one prompt per line (.txt), or one row of token ids per line (.csv)")
    prompts.add_argument("--input-ids", "--input_ids", dest="input_ids", metavar="IDS",
                         help='token ids, e.g. "1 2 3"; several prompts separated by ";"')
    p.add_argument("--max-output-len", "--max_output_len", "--max-new-tokens", dest="max_output_len", type=int,
                   default=8, help="tokens to generate per prompt (default 8)")
    p.add_argument("--max-input-length", "--max_input_length", dest="max_input_length", type=int, default=None,
                   help="truncate each prompt to its first N tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=1, help="1 (default): greedy; 0: no limit")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.0, help="0 (default): off")
    p.add_argument("--random-seed", "--random_seed", dest="random_seed", type=int, default=0)
    p.add_argument("--end-id", "--end_id", dest="end_id", type=int, default=None,
                   help="token that ends a sequence (default: the tokenizer's EOS; none without a tokenizer)")
    p.add_argument("--streaming", action="store_true", help="print tokens as they are generated")
    p.add_argument("--streaming-interval", "--streaming_interval", dest="streaming_interval", type=int, default=5,
                   help="with several prompts, print every N steps (default 5)")
    p.add_argument("--output-csv", "--output_csv", dest="output_csv", metavar="FILE",
                   help="write each prompt's generated token ids as one CSV row")
    p.add_argument("--print-ids", action="store_true", help="also print the prompt and output token ids")
    p.add_argument("--tokenizer-dir", "--tokenizer_dir", dest="tokenizer_dir", default=None,
                   help="a Hugging Face tokenizer directory (default: the checkpoint's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cuda-graphs", action="store_true", help="replay captured CUDA graphs (decode steps)")
    p.add_argument("--onnx", metavar="FILE", default=None,
                   help="generate greedily from this decoder export (past/present ONNX) in onnxruntime instead of "
                   "compiling; SOURCE then only gives the tokenizer and vocabulary")
    from compiler.recipe import add_quantization_arguments

    add_quantization_arguments(p)
    p.set_defaults(func=cmd_run)


def parse_ids(text: str, flag: str = "--input-ids") -> list[int]:
    try:
        ids = [int(token) for token in text.replace(",", " ").split()]
    except ValueError:
        raise MoecError(f"{flag} must be integers separated by spaces, got {text!r}") from None
    if not ids:
        raise MoecError(f"{flag} is empty")
    return ids


def _read_input_file(path: str, tokenizer: Any) -> tuple[list[list[int]], list[str] | None]:
    file = Path(path)
    if not file.is_file():
        raise MoecError(f"input file {path} does not exist")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MoecError(f"input file {path} holds no prompt")
    if file.suffix == ".csv":
        return [parse_ids(line, f"{path} line") for line in lines], None
    if tokenizer is None:
        raise MoecError(f"{path} holds text but the model has no tokenizer; give one with --tokenizer-dir DIR")
    return _encode(tokenizer, lines), lines


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    from frontends.hf.tokenizer import encode_prompts

    return encode_prompts(tokenizer, texts)


def prompts_of(args: argparse.Namespace, tokenizer: Any, source: str) -> tuple[list[list[int]], list[str] | None]:
    """The prompts' token ids, and their texts when given as text."""
    if args.input_text is not None:
        if tokenizer is None:
            raise MoecError(
                f"{source} has no tokenizer, so --input-text cannot be read; give --tokenizer-dir DIR or --input-ids"
            )
        texts = list(args.input_text)
        ids = _encode(tokenizer, texts)
    elif args.input_file is not None:
        ids, texts = _read_input_file(args.input_file, tokenizer)
    else:
        ids, texts = [parse_ids(part) for part in args.input_ids.split(";")], None
    if args.max_input_length is not None:
        if args.max_input_length < 1:
            raise MoecError(f"--max-input-length must be positive, got {args.max_input_length}")
        ids = [prompt[: args.max_input_length] for prompt in ids]
    return ids, texts


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model is read."""
    given = [name for name in ("input_text", "input_file", "input_ids") if getattr(args, name) is not None]
    if len(given) != 1:
        raise MoecError("give exactly one of --input-text, --input-file or --input-ids")
    for index, text in enumerate(args.input_text or []):
        if not text.strip():
            raise MoecError(f"--input-text prompt {index} is empty")
    if args.max_output_len < 0:
        raise MoecError(f"--max-output-len must be >= 0, got {args.max_output_len}")
    if args.top_k < 0:
        raise MoecError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.top_p <= 1:
        raise MoecError(f"--top-p must lie in [0, 1], got {args.top_p}")
    if not args.temperature > 0:
        raise MoecError(f"--temperature must be positive, got {args.temperature}")
    if args.streaming_interval < 1:
        raise MoecError(f"--streaming-interval must be positive, got {args.streaming_interval}")


def sampling_options(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """run.py's flags as `generate` arguments: sampling only when top-k > 1 or top-p > 0."""
    do_sample = args.top_k != 1 or args.top_p > 0
    end_id = args.end_id if args.end_id is not None else getattr(tokenizer, "eos_token_id", None)
    options: dict[str, Any] = dict(do_sample=do_sample, seed=args.random_seed, eos_token_id=end_id)
    if do_sample:
        options.update(temperature=args.temperature, top_k=0 if args.top_k == 1 else args.top_k,
                       top_p=args.top_p if args.top_p > 0 else 1.0)
    return options


class RunStreamer:
    """Hugging Face's streamer protocol: records when the first token arrives and, with `--streaming`, prints."""

    def __init__(self, tokenizer: Any, batch: int, streaming: bool, interval: int, eos: int | None) -> None:
        self.tokenizer, self.batch, self.streaming, self.interval, self.eos = tokenizer, batch, streaming, interval, eos
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finished = [False] * batch
        self._prompt_seen = False
        self._printed = [""] * batch
        self._steps = 0

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first put is the prompt batch
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for row, token in enumerate(value.reshape(-1).tolist()):
            if not self.finished[row]:
                self.tokens[row].append(token)
                self.finished[row] = token == self.eos
        self._steps += 1
        if self.streaming and (self.batch == 1 or self._steps % self.interval == 0):
            self._print()

    def end(self) -> None:
        self.ended_at = time.perf_counter()
        if self.streaming:
            self._print()
            if self.batch == 1:
                print(flush=True)

    def _text(self, row: int) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, self.tokens[row])) + " "
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def _print(self) -> None:
        if self.batch == 1:
            text = self._text(0)
            sys.stdout.write(text[len(self._printed[0]) :])  # only what is new since the last print
            sys.stdout.flush()
            self._printed[0] = text
            return
        for row in range(self.batch):
            print(f"[streaming step {self._steps}] Output [Text {row}]: {self._text(row)!r}", flush=True)


def _print_results(
    prompts: list[list[int]], texts: list[str] | None, outputs: list[list[int]], tokenizer: Any,
    streamer: RunStreamer, args: argparse.Namespace, header: list[str],
) -> None:
    for line in header:
        print(line)
    elapsed_first = (streamer.first_token_at or streamer.started) - streamer.started
    decode_seconds = (streamer.ended_at or time.perf_counter()) - (streamer.first_token_at or streamer.started)
    for index, (prompt, output) in enumerate(zip(prompts, outputs)):
        generated = output[len(prompt) :]
        if texts is None and tokenizer is None:
            print("input ids:  " + " ".join(map(str, prompt)))
            print("output ids: " + " ".join(map(str, generated)))
        else:
            shown = texts[index] if texts is not None else tokenizer.decode(prompt, skip_special_tokens=True)
            print(f"Input [Text {index}]: {shown!r}")
            print(f"Output [Text {index}]: {tokenizer.decode(generated, skip_special_tokens=True)!r}")
            if args.print_ids:
                print("  input ids:  " + " ".join(map(str, prompt)))
                print("  output ids: " + " ".join(map(str, generated)))
        rate = (len(generated) - 1) / decode_seconds if len(generated) > 1 and decode_seconds > 0 else 0.0
        print(f"  [Text {index}] {len(generated)} tokens, time to first token {elapsed_first * 1e3:.1f} ms, "
              f"{rate:.1f} tokens/s after it")
    if args.output_csv:
        with open(args.output_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            for prompt, output in zip(prompts, outputs):
                writer.writerow(output[len(prompt) :])


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from compiler.api import DEFAULT_PIPELINE, CompiledModel, resolve_tokenizer
    from compiler.cli import check_fits_in_memory, load_traced
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from compiler.recipe import pipeline_with_quantization

    from frontends.hf.source import resolve

    _check_arguments(args)
    pipeline = parse_pipeline(pipeline_with_quantization(args.passes if args.passes is not None else DEFAULT_PIPELINE, args))
    # The config and tokenizer first (cheap: no trace), so that bad prompts are refused before any real work.
    vocab = resolve(args.source, seed=args.seed).config.vocab_size
    tokenizer = resolve_tokenizer(args.source, args.tokenizer_dir, vocab)
    prompts, texts = prompts_of(args, tokenizer, args.source)
    if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
        raise MoecError(f"--input-ids must lie in [0, {vocab}) for this model's vocabulary")
    if args.end_id is not None and not 0 <= args.end_id < vocab:
        raise MoecError(f"--end-id {args.end_id} is outside the vocabulary [0, {vocab})")
    options = sampling_options(args, tokenizer)
    if args.onnx is not None:
        return _run_onnx(args, prompts, texts, tokenizer, options, vocab)
    traced = load_traced(args)
    result = run_pipeline(traced, pipeline)
    if result.program.ranks:
        return _run_distributed(result.program, prompts, texts, tokenizer, options, args)
    check_fits_in_memory(result.program, args.device)
    compiled = CompiledModel(result.program, traced, result.history, device=args.device,
                             cuda_graphs=args.cuda_graphs, tokenizer=tokenizer)
    with tqdm(total=len(result.program.weight_nodes()), desc="weights", unit="tensor", file=sys.stderr) as bar:
        compiled.executable(progress=lambda done, total: bar.update(1))
    streamer = RunStreamer(tokenizer, len(prompts), args.streaming, args.streaming_interval, options["eos_token_id"])
    outputs = compiled.generate(prompts, args.max_output_len, streamer=streamer, **options)
    _print_results(prompts, texts, outputs, tokenizer, streamer, args, [])
    return 0


def _run_onnx(
    args: argparse.Namespace, prompts: list[list[int]], texts: list[str] | None, tokenizer: Any,
    options: dict[str, Any], vocab: int,
) -> int:
    """`moec run SOURCE --onnx FILE`: the exported decoder's greedy loop in onnxruntime (backends/onnx/decoder.py)."""
    from backends.onnx.decoder import OnnxDecoder, greedy_generate

    if options["do_sample"]:
        raise MoecError("--onnx generates greedily: leave --top-k at 1 and --top-p at 0")
    if args.passes is not None:
        raise MoecError("--onnx runs the exported file as it is: --passes does not apply")
    decoder = OnnxDecoder(args.onnx)
    if decoder.vocab_size != vocab:
        raise MoecError(f"{args.onnx} has a vocabulary of {decoder.vocab_size}, but {args.source}'s is {vocab}")
    eos = options["eos_token_id"]
    streamer = RunStreamer(tokenizer, len(prompts), args.streaming, args.streaming_interval, eos)
    result = greedy_generate(decoder, prompts, args.max_output_len, eos_token_id=eos, streamer=streamer)
    _print_results(prompts, texts, result.sequences, tokenizer, streamer, args, [f"onnxruntime: {args.onnx}"])
    return 0


def _run_distributed(
    program: Any, prompts: list[list[int]], texts: list[str] | None, tokenizer: Any, options: dict[str, Any],
    args: argparse.Namespace,
) -> int:
    """One rank of a sharded program under torchrun or mpirun; every rank generates, rank 0 prints."""
    import torch

    from backends.torch.distributed import DistributedExecutable, init_distributed, launch_environment, rank_device

    env = launch_environment()
    if env is None:
        raise MoecError(
            f"the pipeline shards the model over {len(program.ranks)} ranks; launch it with "
            f"torchrun --nproc-per-node {len(program.ranks)} -m compiler.cli run ... (or mpirun -n {len(program.ranks)})"
        )
    device = rank_device(args.device, env.local_rank)
    init_distributed(device)
    executable = DistributedExecutable(program, device)
    streaming = args.streaming and env.rank == 0
    streamer = RunStreamer(tokenizer, len(prompts), streaming, args.streaming_interval, options["eos_token_id"])
    outputs = executable.generate(prompts, args.max_output_len, streamer=streamer, **options)
    print(f"rank {env.rank}: {executable.materialized_bytes:,} weight bytes materialized", file=sys.stderr)
    if env.rank == 0:
        _print_results(prompts, texts, outputs, tokenizer, streamer, args, [f"ranks: {len(program.ranks)} ({env.launcher})"])
    torch.distributed.destroy_process_group()
    return 0
