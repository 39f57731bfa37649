"""How the embedded `tiny` model was made: a 4-layer, 8-expert Mixtral trained on Python's own documentation.

The corpus is text every Python installation ships: the `pydoc_data` topics (the language reference behind
`help("if")`) and the docstrings of the standard library's modules, classes and functions, read with `ast`
(nothing is imported, so no module's import side effects run). Documents are split into train / validation /
evaluation by a hash of their text, so the split does not depend on file order; the evaluation split is committed
as `tiny/eval.txt`, which is what `moec eval tiny` scores, so perplexity is the same on every machine; the
validation split is committed as `tiny/calibration.txt`, the `calibrate` pass's builtin text (not the held-out one).

    python frontends/hf/models/train_tiny.py corpus --out /tmp/tiny-corpus         # train/val/eval text
    python frontends/hf/models/train_tiny.py tokenizer --corpus /tmp/tiny-corpus   # byte-level BPE
    python frontends/hf/models/train_tiny.py train --corpus /tmp/tiny-corpus --out frontends/hf/models/tiny

`train` runs on a CUDA GPU when there is one (about a minute on an H200) and on the CPU otherwise (slowly); it
keeps the checkpoint with the best validation loss and writes a Hugging Face model directory
(`MixtralForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load it). Everything is seeded; the
corpus depends on the Python version's standard library (the one used is recorded in `tiny/training.json`).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad
VOCAB_SIZE = 3072
# Directories of the standard library that hold tests or vendored code rather than documentation.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "ensurepip"}
MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    router_aux_loss_coef=0.01,
    output_router_logits=True,
)


def documents() -> list[str]:
    """The pydoc topics (sorted by name) and every standard-library docstring of 40+ characters (sorted paths)."""
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(directory, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if text and len(text) >= 40:
                        docs.append(text.strip())
    return docs


def split_of(text: str) -> str:
    """90% train, 5% validation (checkpoint selection), 5% evaluation (committed; never seen in training)."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 20
    return "eval" if bucket == 0 else "val" if bucket == 1 else "train"


def cmd_corpus(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": [], "eval": []}
    seen: set[str] = set()
    for text in documents():
        if text in seen:  # many methods share a docstring ("Return self==value."): keep one copy
            continue
        seen.add(text)
        splits[split_of(text)].append(text)
    for name, docs in splits.items():
        (out / f"{name}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)):,} characters")
    (out / "python.json").write_text(json.dumps({"python": platform.python_version()}))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = Path(args.corpus)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus / "train.txt")], trainer)
    # Like Mistral's tokenizer: a sequence starts with <s>; generation stops at </s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    tokenizer.save(str(corpus / "tokenizer.json"))
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens")


def _write_tokenizer_files(corpus: Path, out: Path) -> None:
    shutil.copy(corpus / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": MODEL_CONFIG["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )


def _token_stream(tokenizer, path: Path):
    import torch

    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 training: the shipped fp32 weights are what was trained
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"))
    train_ids = _token_stream(tokenizer, corpus / "train.txt").to(device)
    val_ids = _token_stream(tokenizer, corpus / "val.txt").to(device)
    print(f"train {train_ids.numel():,} tokens, validation {val_ids.numel():,} tokens, device {device}")

    config = MixtralConfig(**MODEL_CONFIG, dtype="float32")
    model = MixtralForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    bos = torch.full((args.batch, 1), 0, dtype=torch.long, device=device)

    def batch_of(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        # Each row: <s> then seq_len - 1 consecutive corpus tokens from a random start (documents run together,
        # separated by blank lines, exactly like the evaluation text).
        offsets = starts[:, None] + torch.arange(args.seq_len - 1, device=device)[None, :]
        return torch.cat([bos[: starts.numel()], ids[offsets]], dim=1)

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        span = args.seq_len - 1
        starts = torch.arange(0, val_ids.numel() - span, span, device=device)
        total, count = 0.0, 0
        for chunk in starts.split(args.batch):
            batch = batch_of(val_ids, chunk)
            logits = model(input_ids=batch, output_router_logits=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total, count = total + float(loss), count + batch[:, 1:].numel()
        model.train()
        return total / count

    best, history, started = math.inf, [], time.time()
    steps = args.steps
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - args.seq_len, (args.batch,), device=device, generator=generator)
        batch = batch_of(train_ids, starts)
        loss = model(input_ids=batch, labels=batch).loss  # includes the router's load-balancing loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        out_of_time = args.max_seconds is not None and time.time() - started > args.max_seconds
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            val = validation_loss()
            history.append({"step": step, "train_loss": round(float(loss), 4), "val_nll": round(val, 4)})
            print(f"step {step}: train loss {float(loss):.3f}  validation nll {val:.3f}  {time.time() - started:.0f}s")
            if val < best:
                best = val
                model.save_pretrained(out)
            if out_of_time:
                steps = step
                print(f"stopping at step {step}: --max-seconds {args.max_seconds} reached")
                break
    seconds = time.time() - started
    _write_tokenizer_files(corpus, out)
    shutil.copy(corpus / "eval.txt", out / "eval.txt")
    shutil.copy(corpus / "val.txt", out / "calibration.txt")
    # The shipped config describes an inference model: no router logits in the output.
    saved = json.loads((out / "config.json").read_text())
    saved["output_router_logits"] = False
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    python = json.loads((corpus / "python.json").read_text())["python"]
    record = {
        "corpus_python": python,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "best_val_nll": round(best, 4),
        "steps_run": steps,
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "corpus", "out")},
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained in {seconds:.0f}s; best validation nll {best:.3f} (perplexity {math.exp(best):.1f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("corpus")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_corpus)
    p = sub.add_parser("tokenizer")
    p.add_argument("--corpus", required=True)
    p.set_defaults(func=cmd_tokenizer)
    p = sub.add_parser("train")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop (after a validation) once this is spent")
    p.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
