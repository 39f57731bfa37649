"""The `moec` command line: trace, list passes, compile with per-pass dumps, run, eval, build.

    moec trace tiny
    moec passes
    moec compile tiny --passes fold-weights,dce --print-after-all --dump-dir dumps/
    moec run tiny --input-text "The list" --max-output-len 16
    moec eval tiny
    moec build tiny --output-dir engines/ --dtype float16 --target sm89 --moe-plugin enable

Errors on bad input print one line (`moec: error: ...`) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any

from compiler.errors import MoecError


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_traced(args: argparse.Namespace) -> Any:
    from compiler.api import load

    _status(f"tracing {args.source} ...")
    started = time.perf_counter()
    program = load(args.source, dtype=args.dtype, seed=args.seed, attention=args.attention,
                   tokenizer=getattr(args, "tokenizer_dir", None))
    _status(f"traced in {time.perf_counter() - started:.1f}s")
    return program


def _cmd_trace(args: argparse.Namespace) -> int:
    program = load_traced(args)
    sys.stdout.write(program.format(weights=not args.no_weights))
    return 0


def _option_text(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    parts = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        kind = "|".join(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else getattr(
            annotation, "__name__", str(annotation)
        )
        parts.append(f"{f.name}: {kind} = {f.default}")
    return ", ".join(parts) if parts else "no options"


def _cmd_passes(args: argparse.Namespace) -> int:
    from compiler.api import DEFAULT_PIPELINE
    from compiler.pass_manager import registered_passes

    print(f"default pipeline: {DEFAULT_PIPELINE}\n")
    for name, cls in registered_passes().items():
        print(f"{name}  ({_option_text(cls)})")
        doc = inspect.cleandoc(cls.__doc__ or "")
        print("\n".join("    " + line if line else "" for line in doc.splitlines()))
        print()
    return 0


def _dump_name(index: int, spec: str) -> str:
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec).strip('_')}.txt"


def _dump(dump_dir: Path, index: int, spec: str, program: Any) -> None:
    """One text file per pass; a sharded program gets one file per rank (`NN-spec.rankR.txt`)."""
    name = _dump_name(index, spec)
    if not program.ranks:
        (dump_dir / name).write_text(program.format())
        return
    for rank, rank_program in enumerate(program.ranks):
        (dump_dir / name.replace(".txt", f".rank{rank}.txt")).write_text(rank_program.format())


def _cmd_compile(args: argparse.Namespace) -> int:
    from compiler.api import DEFAULT_PIPELINE
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from compiler.recipe import pipeline_with_quantization

    pipeline = parse_pipeline(pipeline_with_quantization(args.passes if args.passes is not None else DEFAULT_PIPELINE, args))
    names = {p.name for p in pipeline} | {p.spec() for p in pipeline}
    for wanted in [args.print_after, args.explain]:
        if wanted is not None and wanted not in names:
            raise MoecError(f"pass {wanted!r} is not in the pipeline ({', '.join(p.spec() for p in pipeline)})")
    dump_dir = Path(args.dump_dir) if args.dump_dir else None
    if dump_dir is not None:
        try:
            dump_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MoecError(f"cannot create dump directory {dump_dir}: {error.strerror}") from None
    check = args.check_numerics or args.check_numerics_layers
    numerics_ids = _numerics_ids(args, check)
    if args.report is not None and not Path(args.report).resolve().parent.is_dir():
        raise MoecError(f"cannot write the report {args.report}: its directory does not exist")
    program = load_traced(args)
    if dump_dir is not None:
        (dump_dir / "00-trace.txt").write_text(program.format())
    if args.explain is not None:
        # Explanations describe the program as the explained pass receives it.
        position = next(i for i, p in enumerate(pipeline) if args.explain in (p.name, p.spec()))
        before = run_pipeline(program, pipeline[:position]).program
        print(f"== explain {pipeline[position].spec()}")
        print("\n".join(pipeline[position].explain(before)))

    from tqdm import tqdm

    bar = tqdm(total=len(pipeline), desc="passes", unit="pass", file=sys.stderr, disable=not pipeline)

    def on_pass(record: Any) -> None:
        bar.update(1)
        bar.set_postfix_str(record.spec)
        if dump_dir is not None:
            _dump(dump_dir, record.index, record.spec, record.program)
        if args.print_after_all or args.print_after in (record.name, record.spec):
            tqdm.write(f"== after {record.spec} ({record.seconds:.2f}s, changed={record.changed}, {record.stats})")
            tqdm.write(record.program.format(weights=not args.no_weights), end="")

    result = run_pipeline(program, pipeline, on_pass=on_pass)
    from backends.onnx import handle_onnx_cli

    for exported in handle_onnx_cli(args, program, result.history):
        _status("wrote " + exported.summary())
    bar.close()
    print("== pipeline")
    for record in result.history:
        stats = ", ".join(f"{k}={v}" for k, v in record.stats.items())
        print(f"{record.index:2d}. {record.spec:<24} {record.seconds:7.3f}s  changed={record.changed}  {stats}")
    if not (args.print_after_all or args.print_after):
        print("== final graph")
        sys.stdout.write(result.program.format(weights=not args.no_weights))
    if dump_dir is not None:
        _status(f"wrote {len(result.history) + 1} graph dumps to {dump_dir}")
    numerics = None
    if check:
        from compiler.api import resolve_tokenizer
        from compiler.numerics import check_numerics

        tokenizer = resolve_tokenizer(args.source, None, program.config.vocab_size)
        numerics = check_numerics(
            program, result.history, tokenizer, numerics_ids, layers=args.check_numerics_layers, progress=_status
        )
        sys.stdout.write(numerics.format())
    if args.report is not None:
        from compiler.report import write_report

        written = write_report(args.report, program, result.history, numerics)
        _status(f"wrote the pass report to {written} ({written.stat().st_size:,} bytes)")
    # A pass over its numerics budget is a finding, not bad input: status 1 (bad input stays 2).
    return 1 if numerics is not None and numerics.first_diverging is not None else 0


def _numerics_ids(args: argparse.Namespace, check: bool) -> list[list[int]] | None:
    """`--input-ids` of `moec compile` (prompts separated by `;`): the sample of `--check-numerics`."""
    if args.input_ids is None:
        return None
    if not check:
        raise MoecError("--input-ids on moec compile is the sample of --check-numerics; add --check-numerics")
    from compiler.run_cli import parse_ids

    return [parse_ids(part) for part in args.input_ids.split(";")]


def check_fits_in_memory(program: Any, device: str) -> None:
    """Refuses, before reading a byte, to materialize more weights than the machine holds (`mixtral-8x7b` on a CPU)."""
    import torch

    needed = program.weight_bytes()
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        available, where = torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    else:
        available, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if needed > 0.9 * available:
        raise MoecError(
            f"the compiled model needs {needed / 1e9:.1f} GB of weights but {where} holds {available / 1e9:.1f} GB; "
            "shard it (e.g. --passes 'canonicalize,fuse-moe,shard{tp=8},dce' under torchrun) or use a smaller model"
        )


def _read_dataset(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise MoecError(f"dataset file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MoecError(f"cannot read dataset file {path}: {error}") from None
    if not text.strip():
        raise MoecError(f"dataset file {path} is empty")
    return text


def _cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a text file (default: the embedded model's held-out text) under the compiled model."""
    from tqdm import tqdm

    from compiler.api import DEFAULT_PIPELINE, CompiledModel, resolve_tokenizer
    from compiler.pass_manager import parse_pipeline, run_pipeline
    from compiler.recipe import pipeline_with_quantization
    from frontends.hf.source import EMBEDDED_MODELS_DIR

    if args.seq_len < 2:
        raise MoecError(f"--seq-len must be at least 2 (one token of context and one target), got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise MoecError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    dataset = args.dataset or str(EMBEDDED_MODELS_DIR / "tiny" / "eval.txt")
    text = _read_dataset(dataset)
    pipeline = parse_pipeline(pipeline_with_quantization(args.passes if args.passes is not None else DEFAULT_PIPELINE, args))
    traced = load_traced(args)
    tokenizer = resolve_tokenizer(args.source, args.tokenizer_dir, traced.config.vocab_size)
    if tokenizer is None:
        raise MoecError(f"{args.source} has no tokenizer to read {dataset} with; name one with --tokenizer-dir DIR")
    result = run_pipeline(traced, pipeline)
    if result.program.ranks:
        raise MoecError("moec eval runs one process; evaluate a sharded pipeline's numerics with its unsharded form")
    check_fits_in_memory(result.program, args.device)
    compiled = CompiledModel(result.program, traced, result.history, device=args.device, tokenizer=tokenizer)
    started = time.perf_counter()
    with tqdm(desc="windows", unit="window", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        scored = compiled.score(text, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
                                max_tokens=args.max_tokens, progress=progress)
    seconds = time.perf_counter() - started
    print(f"dataset:    {dataset}")
    print(f"passes:     {','.join(record.spec for record in result.history)}")
    print(f"seq_len:    {args.seq_len} (stride {args.stride or args.seq_len - 1})")
    print(f"tokens:     {scored.tokens}")
    print(f"nll:        {scored.nll:.6f}")
    print(f"perplexity: {scored.perplexity:.4f}")
    _status(f"scored in {seconds:.1f}s ({scored.tokens / seconds:,.0f} tokens/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moec", description="A graph-rewrite compiler for Mixtral MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "source",
            help="checkpoint directory, 'tiny' (embedded trained model), 'tiny-random' or 'mixtral-8x7b' (random weights)",
        )
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
        p.add_argument("--seed", type=int, default=0, help="seed of dummy weights (presets)")
        p.add_argument(
            "--attention",
            choices=["moec", "eager"],
            default="moec",
            help="trace attention as moec.attention (default) or as Hugging Face's eager ATen ops for canonicalize",
        )
        p.add_argument("--no-weights", action="store_true", help="omit weight lines from printed graphs")

    p_trace = sub.add_parser("trace", help="trace a model and print its graph")
    add_source(p_trace)
    p_trace.set_defaults(func=_cmd_trace)

    p_passes = sub.add_parser("passes", help="list passes with their options")
    p_passes.set_defaults(func=_cmd_passes)

    p_compile = sub.add_parser("compile", help="run a pass pipeline and print or dump the graphs")
    add_source(p_compile)
    p_compile.add_argument("--passes", default=None, help="e.g. 'fold-weights,dce' (default: the default pipeline)")
    group = p_compile.add_mutually_exclusive_group()
    group.add_argument("--print-after-all", action="store_true")
    group.add_argument("--print-after", metavar="NAME")
    p_compile.add_argument("--dump-dir", metavar="DIR", help="write one numbered text file per pass")
    p_compile.add_argument("--explain", metavar="NAME", help="say per region why pass NAME does or does not rewrite")
    p_compile.add_argument("--check-numerics", action="store_true",
                           help="run every pass's program on the torch backend and name the first pass over its "
                                "numerics budget (exit status 1 when one is)")
    p_compile.add_argument("--check-numerics-layers", action="store_true",
                           help="--check-numerics, also naming the first decoder layer whose hidden state diverges")
    p_compile.add_argument("--input-ids", metavar="IDS",
                           help="the --check-numerics sample: token ids, prompts separated by ';' (default: 2 "
                                "prompts x 64 tokens of the bundled text)")
    p_compile.add_argument("--report", metavar="FILE",
                           help="write a self-contained HTML report of the pipeline (diffs, op counts, layer picture)")
    from backends.onnx import add_onnx_cli_arguments

    add_onnx_cli_arguments(p_compile)
    from compiler.recipe import add_quantization_arguments

    add_quantization_arguments(p_compile)
    p_compile.set_defaults(func=_cmd_compile)

    from compiler.run_cli import add_run_cli

    add_run_cli(sub, add_source)

    p_eval = sub.add_parser("eval", help="perplexity of a text file under the compiled model (torch backend)")
    add_source(p_eval)
    p_eval.add_argument("--passes", default=None)
    p_eval.add_argument("--dataset", metavar="FILE", default=None,
                        help="UTF-8 text to score (default: the embedded tiny model's held-out text)")
    p_eval.add_argument("--max-tokens", type=int, default=None, help="score at most the first N tokens")
    p_eval.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    p_eval.add_argument("--stride", type=int, default=None, help="new targets per window (default seq_len - 1)")
    p_eval.add_argument("--batch-size", type=int, default=8)
    p_eval.add_argument("--tokenizer-dir", "--tokenizer_dir", dest="tokenizer_dir", default=None,
                        help="a Hugging Face tokenizer directory (default: the checkpoint's own)")
    p_eval.add_argument("--device", default="cpu")
    add_quantization_arguments(p_eval)
    p_eval.set_defaults(func=_cmd_eval)

    from compiler.build_cli import add_build_cli

    add_build_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoecError as error:
        print(f"moec: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
