"""Instruction mix of the one-row GEMV loops and the swapped MoE tiles on sm90, compiled here (no GPU needed).

Compiles `triton_quant._gemv_kernel` (byte tiles), `triton_gemv_words._gemv_words_kernel` and
`triton_moe_swapped._gate_up_swapped_kernel` (codes converted by Triton's integer ops, and in PTX: `ASM`) for an
H100/H200 (`triton.compile` with a `GPUTarget("cuda", 90, 32)`, pointer and stride arguments specialized as
16-divisible, as they are at run time for Mixtral's shapes), disassembles the cubin with nvdisasm and counts the
instructions of the hot loop (the longest block closed by a backward branch): per code byte each thread streams,
and how many of them move data through shared memory (STS/STSM/LDS/BAR: a layout conversion inside the loop, or,
in the swapped tiles, the codes' and activations' path through their shared-memory pipeline).

    pip install nvidia-cuda-nvdisasm   # nvdisasm, if the CUDA toolkit's is not on PATH
    python3 bench/gemv_sass.py [--nvdisasm PATH] [--markdown FILE]

These are static counts of the compiled loop, not timings: the measured speed is in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from backends.torch import triton_gemv_words, triton_moe_swapped, triton_quant  # noqa: E402

SHARED = ("STS", "STSM", "LDS", "LDSM", "BAR")


@dataclass(frozen=True)
class Variant:
    label: str
    quant: int  # 1 int8, 2 int4
    block_n: int
    warps: int
    words: int = 0  # words per thread (the word kernel); 0: byte tiles
    block_k: int = 0  # byte tiles only
    group_size: int = 0
    prefetch: bool = False  # byte tiles: the next K tile's loads in flight (the tables' stages = 2)
    swapped: bool = False  # the swapped MoE gate/up tiles: block_n columns of I (2x weight rows), block_k deep
    asm: bool = True  # word and swapped kernels: codes to floats in PTX

    def code_bytes_per_thread(self) -> int:
        if self.swapped:
            return 2 * self.block_n * self.block_k // (2 if self.quant == 2 else 1) // (32 * self.warps)
        if self.words:
            return self.block_n * self.words * 4
        return self.block_n * self.block_k // (2 if self.quant == 2 else 1) // (32 * self.warps)


VARIANTS = [
    Variant("int8 byte tiles (fourth-session table)", 1, 16, 8, block_k=512, prefetch=True),
    Variant("int8 words, 1 per thread", 1, 8, 4, words=1),
    Variant("int8 words, 2 per thread (table)", 1, 8, 4, words=2),
    Variant("int4 byte tiles (fourth-session table)", 2, 8, 4, block_k=1024, prefetch=True),
    Variant("int4 words, 1 per thread", 2, 8, 4, words=1),
    Variant("int4 words, 4 per thread (table)", 2, 4, 2, words=4),
    Variant("int4 g128 byte tiles (fourth-session table)", 2, 16, 8, block_k=1024, group_size=128, prefetch=True),
    Variant("int4 g128 words, 2 per thread (table)", 2, 8, 4, words=2, group_size=128),
    Variant("int4 swapped MoE gate/up, Triton integer ops", 2, 64, 4, block_k=128, swapped=True, asm=False),
    Variant("int4 swapped MoE gate/up, PTX", 2, 64, 4, block_k=128, swapped=True),
    Variant("int4 swapped MoE gate/up, PTX, K 256, 8 warps (table)", 2, 64, 8, block_k=256, swapped=True),
    Variant("int8 swapped MoE gate/up, Triton integer ops", 1, 32, 4, block_k=128, swapped=True, asm=False),
    Variant("int8 swapped MoE gate/up, PTX (table)", 1, 32, 4, block_k=128, swapped=True),
]


def find_nvdisasm(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("nvdisasm")
    if found:
        return found
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        hits = glob.glob(os.path.join(root, "nvidia", "*", "bin", "nvdisasm"))
        if hits:
            return hits[0]
    raise SystemExit("gemv_sass: error: no nvdisasm (pip install nvidia-cuda-nvdisasm, or pass --nvdisasm PATH)")


def compile_variant(v: Variant):
    k_groups = v.group_size or 4096
    stages = 1
    if v.swapped:
        fn = triton_moe_swapped._gate_up_swapped_kernel
        names = ["x_ptr", "w_ptr", "s_ptr", "inter_ptr", "sorted_slots_ptr", "block_expert_ptr", "num_slots",
                 "num_pid_m", "N", "K", "stride_xm", "stride_we", "stride_wn", "stride_se", "stride_sn", "stride_im"]
        types = ["*bf16", "*i8" if v.quant == 1 else "*u8", "*bf16", "*bf16", "*i32", "*i32"] + ["i32"] * 10
        consts = dict(TOPK=2, BLOCK_M=16, BLOCK_N=v.block_n, BLOCK_K=v.block_k, GROUP_M=8, QUANT=v.quant,
                      GROUP_SIZE=k_groups, PER_ROW=v.group_size == 0, DOT_F32=False, USE_PDL=True, ASM=v.asm)
        stages = 3 if v.block_k > 128 else 4
    elif v.words:
        fn = triton_gemv_words._gemv_words_kernel
        names = ["x_pairs", "w_words", "s_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_wn", "stride_sn"]
        types = ["*i32", "*i32", "*bf16", "*bf16", "*bf16", "i32", "i32", "i32", "i32"]
        consts = dict(GROUP_SIZE=k_groups, QUANT=v.quant, HAS_BIAS=False, BLOCK_N=v.block_n,
                      BLOCK_K=triton_gemv_words.words_block_k(v.quant, v.warps, v.words), EVEN_K=True,
                      PER_ROW=v.group_size == 0, FP16=False, ASM=v.asm, WPT=v.words, USE_PDL=True)
    else:
        fn = triton_quant._gemv_kernel
        names = ["x_ptr", "w_ptr", "s_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_wn", "stride_sn"]
        types = ["*bf16", "*i8" if v.quant == 1 else "*u8", "*bf16", "*bf16", "*bf16", "i32", "i32", "i32", "i32"]
        consts = dict(GROUP_SIZE=k_groups, QUANT=v.quant, HAS_BIAS=False, BLOCK_N=v.block_n, BLOCK_K=v.block_k,
                      EVEN_K=True, PER_ROW=v.group_size == 0,
                      GROUPS=triton_quant.tile_groups(v.block_k, v.group_size), PREFETCH=v.prefetch, USE_PDL=True)
    signature = dict(zip(names, types))
    signature.update({name: "constexpr" for name in consts})
    runtime_counts = ("num_slots", "num_pid_m")  # not 16-divisible at run time
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(names) if name not in runtime_counts}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": v.warps, "num_stages": stages})


def hot_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest block that a backward branch closes."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\s*\.L_x_\d+:", line)}
    best = None
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            start = labels[target.group(1)]
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
    if best is None:
        raise SystemExit("gemv_sass: error: no loop found in the disassembly")
    ops: collections.Counter = collections.Counter()
    for line in lines[best[0]:best[1] + 1]:
        opcode = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if opcode:
            ops[opcode.group(1).split(".")[0]] += 1
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvdisasm", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    nvdisasm = find_nvdisasm(args.nvdisasm)
    rows = ["| kernel | config (rows, warps) | code bytes / thread / step | loop instructions | per code byte | "
            "shared-memory instructions | top opcodes |", "|" + "---|" * 7]
    with tempfile.TemporaryDirectory() as scratch:
        for v in VARIANTS:
            cubin = os.path.join(scratch, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compile_variant(v).asm["cubin"])
            ops = hot_loop(subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout)
            total = sum(ops.values())
            per_byte = total / v.code_bytes_per_thread()
            shared = sum(ops[name] for name in SHARED)
            top = ", ".join(f"{name} {count}" for name, count in ops.most_common(6))
            rows.append(f"| {v.label} | {v.block_n}, {v.warps} | {v.code_bytes_per_thread()} | {total} | "
                        f"{per_byte:.1f} | {shared} | {top} |")
            print(rows[-1], flush=True)
    text = f"triton {triton.__version__}, target sm90\n\n" + "\n".join(rows) + "\n"
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
