"""ONNX export: every exported file passes the full ONNX checker and computes backends/torch's logits in
onnxruntime (CPU), at two sequence lengths and batch 2 from one file, at every point of the pipeline."""

from __future__ import annotations

import argparse
import dataclasses
from functools import lru_cache
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")  # not on every GPU image; the CPU test setup installs it

from backends.onnx import OPSET, add_onnx_cli_arguments, export_onnx, handle_onnx_cli
from backends.onnx.context import OnnxExportError
from backends.onnx.export import stream_pieces
from backends.onnx.moe import interleave_gate_up
from backends.onnx.ranks import export_ranks, simulate_ranks
from backends.torch.runtime import TorchExecutable
from compiler.api import CompiledModel, load
from compiler.errors import MoecError
from compiler.ir import Program, op_name
from compiler.pass_manager import parse_pipeline, run_pipeline
from compiler.weights import MemoryTensor, RandomTensor, cast_weight, concat_weights, stack_weights
from tests.models import TINY_CONFIGS, TinyConfig, hf_model, input_ids, max_rel_err
from tests.passes import test_shard as shard_tests

PIPELINE = "canonicalize,fuse-moe,dce"
SEQ_LENGTHS = (5, 11)
TOLERANCE = 1e-4


@lru_cache(maxsize=None)
def compiled(config: TinyConfig) -> CompiledModel:
    traced = load(hf_model(config))
    result = run_pipeline(traced, parse_pipeline(PIPELINE))
    return CompiledModel(result.program, traced, result.history)


def _check_and_compare(path: Path, program: Program, config: TinyConfig) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = TorchExecutable(program)
    for seq in SEQ_LENGTHS:
        ids = input_ids(config, 2, seq)
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        expected = reference(ids)
        assert logits.shape == tuple(expected.shape)
        assert max_rel_err(torch.from_numpy(logits), expected) <= TOLERANCE


STAGES = [("trace", "ootb"), ("canonicalize", "ootb"), ("fuse-moe", "ootb"), ("fuse-moe", "ort")]
# Every tiny config but the slowest to trace (3 layers, window, tied), whose features the others cover: GQA, MHA,
# MQA, top-k 1-3, 4-8 experts, 1-3 layers, sliding window, tied embeddings. Keeps this file's CPU time in budget.
MATRIX_CONFIGS = [c for c in TINY_CONFIGS if c.id != "mha-e8-k2-l3-window-tied"]


@pytest.mark.parametrize("config", MATRIX_CONFIGS, ids=[c.id for c in MATRIX_CONFIGS])
def test_export_matches_torch_backend(config: TinyConfig, tmp_path: Path) -> None:
    model = compiled(config)
    for after, moe in STAGES:
        exported = export_onnx(model, tmp_path / f"{after}-{moe}.onnx", after=after, moe=moe)
        _check_and_compare(exported.path, model.graph_after(after), config)


def test_graph_io_has_dynamic_batch_and_seq(tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    exported = export_onnx(compiled(config), tmp_path / "model.onnx", after="trace")
    graph = onnx.load(str(exported.path), load_external_data=False).graph
    (ids,) = graph.input
    (logits,) = graph.output
    assert [d.dim_param for d in ids.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", "seq", config.vocab]
    assert exported.opset == OPSET == 23


def test_fused_graph_uses_opset23_fused_ops_and_no_data_dependent_shapes(tmp_path: Path) -> None:
    config = TINY_CONFIGS[2]  # sliding window: Attention takes a boolean mask
    exported = export_onnx(compiled(config), tmp_path / "model.onnx", after="fuse-moe", moe="ootb")
    ops = exported.op_types
    layers = config.layers
    assert (ops["Attention"], ops["RMSNormalization"], ops["RotaryEmbedding"]) == (layers, 2 * layers + 1, 2 * layers)
    assert ops["TopK"] == layers
    assert "NonZero" not in ops and "MoE" not in ops
    model = onnx.load(str(exported.path), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 23)}


def test_decompose_option_emits_elementary_ops_with_same_numerics(tmp_path: Path) -> None:
    config = TINY_CONFIGS[3]  # MQA, tied embeddings
    model = compiled(config)
    exported = export_onnx(
        model, tmp_path / "model.onnx", after="fuse-moe", decompose=("attention", "rms_norm", "rope")
    )
    assert not {"Attention", "RMSNormalization", "RotaryEmbedding"} & set(exported.op_types)
    _check_and_compare(exported.path, model.program, config)


def _with_normalization(program: Program, normalization: str) -> Program:
    changed = program.clone()
    for node in changed.graph.nodes:
        if op_name(node) == "moec.moe":
            node.args = (*node.args[:5], normalization, *node.args[6:])
    changed.graph_module.recompile()
    return changed


@pytest.mark.parametrize("moe", ["ootb", "ort"])
def test_moe_without_renormalization(moe: str, tmp_path: Path) -> None:
    config = TINY_CONFIGS[5]
    program = _with_normalization(compiled(config).program, "none")
    exported = export_onnx(program, tmp_path / "model.onnx", moe=moe)
    _check_and_compare(exported.path, program, config)


def test_ort_mode_emits_com_microsoft_moe_with_interleaved_weights(tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    exported = export_onnx(compiled(config), tmp_path / "model.onnx", moe="ort")
    model = onnx.load(str(exported.path), load_external_data=False)
    moe_nodes = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moe_nodes) == config.layers and all(n.domain == "com.microsoft" for n in moe_nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe_nodes[0].attribute}
    assert attrs == {
        "k": config.top_k,
        "activation_type": b"swiglu",
        "swiglu_fusion": 1,
        "activation_alpha": 1.0,
        "activation_beta": 0.0,
        "normalize_routing_weights": 1,
    }
    (first_moe, *_) = [n for n in compiled(config).program.graph.nodes if op_name(n) == "moec.moe"]
    assert moe_nodes[0].input[2] == f"{first_moe.args[2].name}.interleaved"
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in model.opset_import}


def test_plugin_mode_emits_one_trt_plugin_node_per_layer(tmp_path: Path) -> None:
    config = TINY_CONFIGS[1]
    exported = export_onnx(compiled(config), tmp_path / "model.onnx", moe="plugin")
    onnx.checker.check_model(str(exported.path), full_check=True)
    model = onnx.load(str(exported.path), load_external_data=False)
    (plugin,) = [n for n in model.graph.node if n.op_type == "MoE"]
    assert plugin.domain == "trt.plugins"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugin.attribute}
    assert attrs == {
        "plugin_version": b"1",
        "plugin_namespace": b"moec",
        "top_k": 1,
        "normalization": b"renormalize",
        "activation": b"swiglu",
        "num_experts": 8,
        "num_local_experts": 8,
        "expert_offset": 0,
    }
    (moe_node,) = [n for n in compiled(config).program.graph.nodes if op_name(n) == "moec.moe"]
    weight_names = [arg.name for arg in moe_node.args[1:4]]
    assert list(plugin.input[1:]) == weight_names
    assert set(weight_names) <= {t.name for t in model.graph.initializer}


EXPERT_PARALLEL_SPECS = ["shard{tp=2,moe_ep=2}", "shard{tp=4,moe_tp=2,moe_ep=2}"]


@pytest.mark.parametrize("spec", EXPERT_PARALLEL_SPECS)
def test_expert_parallel_ranks_compute_the_unsharded_logits(spec: str, tmp_path: Path) -> None:
    """Every rank routes over all experts but holds a block of them (expert_offset): simulated together, the ranks'
    ONNX files give the unsharded program's logits."""
    sharded = run_pipeline(shard_tests.fused_program(), parse_pipeline(spec)).program
    moes = [node for rank in sharded.ranks for node in rank.graph.nodes if op_name(node) == "moec.moe"]
    offsets = {node.kwargs["expert_offset"] for node in moes}
    assert offsets == {0, shard_tests.EXPERTS // 2}
    exports = export_ranks(sharded, tmp_path, moe="ootb")
    reference = TorchExecutable(shard_tests.fused_program())
    ids = input_ids(shard_tests.SHARD_CONFIG, 2, 7)
    expected = reference(ids)
    for logits in simulate_ranks(exports, ids.numpy()):
        assert max_rel_err(torch.from_numpy(logits), expected) <= TOLERANCE


def _expert_parallel_rank1() -> Program:
    return run_pipeline(shard_tests.fused_program(), parse_pipeline(EXPERT_PARALLEL_SPECS[0])).program.ranks[1]


def test_plugin_mode_carries_the_expert_block(tmp_path: Path) -> None:
    exports = export_ranks(_expert_parallel_rank1(), tmp_path, moe="plugin")
    plugins = [
        node
        for segment in exports[0].segments
        for node in onnx.load(str(segment.path), load_external_data=False).graph.node
        if node.op_type == "MoE"
    ]
    assert len(plugins) == shard_tests.SHARD_CONFIG.layers
    for plugin in plugins:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugin.attribute}
        assert (attrs["num_experts"], attrs["num_local_experts"], attrs["expert_offset"]) == (12, 6, 6)


def test_ort_mode_refuses_an_expert_block(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError) as error:
        export_ranks(_expert_parallel_rank1(), tmp_path, moe="ort")
    assert str(error.value) == (
        "moe (moec.moe) is expert-parallel (experts [6, 12) of 12): onnxruntime's com.microsoft::MoE runs all of the "
        "router's experts and cannot take an expert block; export it with moe='ootb' or moe='plugin'"
    )


def test_plugin_mode_parses_with_tensorrt_rtx(tmp_path: Path) -> None:
    """TensorRT-RTX's own ONNX parser accepts the plugin-mode file once the `MoE` creator is registered.

    Parsed in a child process: TensorRT-RTX finds plugins only with `libtensorrt_rtx.so` on the LD_LIBRARY_PATH the
    process started with (`plugin_environment`), and aborts the whole process otherwise.
    """
    import subprocess
    import sys

    pytest.importorskip("tensorrt_rtx")
    from backends.tensorrt.runtime import plugin_environment

    exported = export_onnx(compiled(TINY_CONFIGS[0]), tmp_path / "model.onnx", moe="plugin")
    script = (
        "import sys, tensorrt_rtx as trt\n"
        "from backends.tensorrt.plugin import register_moe_plugin\n"
        "register_moe_plugin()\n"
        "logger = trt.Logger(trt.Logger.ERROR)\n"
        "network = trt.Builder(logger).create_network(0)\n"
        "parser = trt.OnnxParser(network, logger)\n"
        "ok = parser.parse_from_file(sys.argv[1])\n"
        "print('parsed' if ok else [parser.get_error(i).desc() for i in range(parser.num_errors)])\n"
        "print(sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers)))\n"
    )
    environment = {**plugin_environment(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", script, str(exported.path)], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["parsed", str(TINY_CONFIGS[0].layers)]


def test_weights_live_in_one_external_data_file(tmp_path: Path) -> None:
    config = TINY_CONFIGS[3]  # tied embeddings: one initializer serves embedding and lm_head
    program = compiled(config).program
    exported = export_onnx(program, tmp_path / "out" / "model.onnx")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "model.onnx.data"]
    model = onnx.load(str(exported.path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) <= 1024 for t in inline)  # only small shape/scalar constants stay in the .onnx
    for tensor in external:
        entries = {e.key: e.value for e in tensor.external_data}
        assert entries["location"] == "model.onnx.data" and not tensor.raw_data
        assert int(entries["offset"]) % 4096 == 0
    used_exprs = {id(node.meta["weight"]) for node in program.weight_nodes() if node.users}
    assert exported.initializer_count == len(external) == len(used_exprs) == config.layers * 9 + 3  # tied: embed = lm_head
    assert exported.data_bytes == exported.data_path.stat().st_size
    assert exported.path.stat().st_size < 100_000


def test_stream_pieces_concatenate_to_the_materialized_weight() -> None:
    experts = [
        concat_weights([RandomTensor(f"w1.{e}", (6, 4), torch.float32, 0), RandomTensor(f"w3.{e}", (6, 4), torch.float32, 0)])
        for e in range(3)
    ]
    expr = cast_weight(stack_weights(experts), torch.bfloat16)
    pieces = list(stream_pieces(expr))
    assert len(pieces) == 6 and all(p.numel() == 24 for p in pieces)
    assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), expr.materialize().reshape(-1))


def test_interleave_gate_up_rewrite() -> None:
    w13 = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # E=2, I=3, H=3
    leaf = MemoryTensor("w13", w13)
    interleaved = interleave_gate_up(leaf).materialize()
    assert torch.equal(interleaved[:, 0::2], w13[:, :3]) and torch.equal(interleaved[:, 1::2], w13[:, 3:])
    stacked = interleave_gate_up(stack_weights([MemoryTensor("a", w13[0]), MemoryTensor("b", w13[1])]))
    assert stacked.describe() == "stack(interleave_gate_up(memory(a)), interleave_gate_up(memory(b)), dim=0)"
    assert torch.equal(stacked.materialize(), interleaved)


def test_export_after_a_pass_not_in_the_pipeline_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MoecError, match=r"^pass 'shard' is not in this pipeline \(passes run: canonicalize, fuse-moe, dce\)$"):
        export_onnx(compiled(TINY_CONFIGS[0]), tmp_path / "model.onnx", after="shard")


def test_export_to_unwritable_directory_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OnnxExportError, match=r"^cannot write ONNX model to .*/file/sub/model\.onnx: Not a directory$"):
        export_onnx(compiled(TINY_CONFIGS[0]).program, blocker / "sub" / "model.onnx")


def test_bad_options_are_errors(tmp_path: Path) -> None:
    program = compiled(TINY_CONFIGS[0]).program
    with pytest.raises(OnnxExportError, match=r"^unknown MoE export mode 'trt'; choose one of ootb, plugin, ort$"):
        export_onnx(program, tmp_path / "model.onnx", moe="trt")
    with pytest.raises(OnnxExportError, match=r"^ONNX output path must end in \.onnx, got .*model\.pb$"):
        export_onnx(program, tmp_path / "model.pb")
    with pytest.raises(OnnxExportError, match=r"^after='dce' needs a compiled model"):
        export_onnx(program, tmp_path / "model.onnx", after="dce")


def test_op_without_converter_is_named(tmp_path: Path) -> None:
    program = compiled(TINY_CONFIGS[0]).traced.clone()
    node = next(n for n in program.graph.nodes if op_name(n) == "aten.silu")
    node.target = torch.ops.aten.gelu.default
    with pytest.raises(OnnxExportError, match=rf"^no ONNX converter for aten.gelu \(node {node.name}\)$"):
        export_onnx(program, tmp_path / "model.onnx")


def test_cli_glue_exports_the_requested_stages(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_onnx_cli_arguments(parser)
    model = compiled(TINY_CONFIGS[0])
    args = parser.parse_args(["--export-onnx-after", "trace", "--export-onnx-after", "fuse-moe", "--onnx-dir", str(tmp_path), "--moe-export", "ort"])
    exports = handle_onnx_cli(args, model.traced, model.history)
    assert [e.path.name for e in exports] == ["00-trace.onnx", "02-fuse-moe.onnx"]
    assert [e.moe for e in exports] == ["ort", "ort"]
    args = parser.parse_args(["--export-onnx-after", "all", "--onnx-dir", str(tmp_path / "all")])
    assert [e.path.name for e in handle_onnx_cli(args, model.traced, model.history)] == [
        "00-trace.onnx", "01-canonicalize.onnx", "02-fuse-moe.onnx", "03-dce.onnx"
    ]
    args = parser.parse_args(["--export-onnx-after", "shard", "--onnx-dir", str(tmp_path)])
    with pytest.raises(MoecError, match=r"^--export-onnx-after 'shard': no such pass in the pipeline \(passes run: canonicalize, fuse-moe, dce\)$"):
        handle_onnx_cli(args, model.traced, model.history)
    args = parser.parse_args(["--export-onnx-after", "dce"])
    with pytest.raises(MoecError, match=r"^--export-onnx-after needs --onnx-dir DIR$"):
        handle_onnx_cli(args, model.traced, model.history)
