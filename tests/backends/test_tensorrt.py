"""TensorRT backend: engines build (both MoE lowerings, fp32/fp16/bf16), the ONNX each build parsed computes
backends/torch's logits in onnxruntime, config.json says what was built, and bad input fails cleanly.

No GPU here: engines are built (TensorRT-RTX builds ahead of time for a chosen SM) but never run; the loader test
checks it refuses with the exact reason. Skipped entirely where no TensorRT is importable.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.tensorrt.runtime import tensorrt_available

pytestmark = pytest.mark.skipif(not tensorrt_available(), reason="no TensorRT (tensorrt or tensorrt_rtx) importable")

from backends.tensorrt import build_options  # noqa: E402
from backends.tensorrt.build import BuildOptions, build_engines  # noqa: E402
from backends.tensorrt.runtime import (  # noqa: E402
    EngineRunError,
    TargetError,
    TensorRTBuildError,
    TensorRTUnavailableError,
    link_library,
    plugin_library_dir,
    tensorrt_info,
)
from backends.tensorrt.verify import run_onnxruntime, simulate_ranks  # noqa: E402
from backends.torch.runtime import TorchExecutable  # noqa: E402
from compiler.api import load  # noqa: E402
from compiler import cli  # noqa: E402
from compiler.errors import MoecError  # noqa: E402
from compiler.ir import Program  # noqa: E402
from compiler.pass_manager import parse_pipeline, run_pipeline  # noqa: E402
from tests.models import TINY_CONFIGS, TinyConfig, hf_model, input_ids, max_rel_err  # noqa: E402

PIPELINE = "canonicalize,fuse-moe,dce"
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
# RTX builds ahead of time for named SMs; data-center TensorRT builds for the GPU it runs on (no targets).
TARGETS = ("sm89",) if tensorrt_available() and tensorrt_info().targets else ()


@lru_cache(maxsize=None)
def program(config: TinyConfig, dtype: str) -> Program:
    return run_pipeline(load(hf_model(config), dtype=dtype), parse_pipeline(PIPELINE)).program


def _build(config: TinyConfig, dtype: str, moe_plugin: bool, out: Path, **overrides: object) -> dict:
    options = BuildOptions(moe_plugin=moe_plugin, targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True, **overrides)
    return build_engines(program(config, dtype), out, options, progress=lambda line: None).config


def _check_onnx_matches_torch(out: Path, config: TinyConfig, dtype: str) -> None:
    reference = TorchExecutable(program(config, dtype))
    for seq in (5, 11):
        ids = input_ids(config, 2, seq)
        logits = run_onnxruntime(out / "onnx" / "rank0.onnx", ids.numpy())
        expected = reference(ids)
        assert logits.shape == tuple(expected.shape)
        assert max_rel_err(torch.from_numpy(logits.astype(np.float32)), expected.float()) <= TOLERANCE[dtype]


@pytest.mark.parametrize("moe_plugin", [False, True], ids=["ootb", "plugin"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_engine_builds_and_its_onnx_matches_torch(dtype: str, moe_plugin: bool, tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    out = tmp_path / "engines"
    built = _build(config, dtype, moe_plugin, out)
    engine = out / "rank0.engine"
    assert engine.stat().st_size > 100_000
    (rank,) = built["ranks"]
    (entry,) = rank["engines"]
    assert entry["bytes"] == engine.stat().st_size
    assert built["dtype"] == dtype
    assert built["moe_lowering"] == ("plugin" if moe_plugin else "ootb")
    if dtype in TOLERANCE:  # onnxruntime's CPU provider has no bfloat16 kernels
        _check_onnx_matches_torch(out, config, dtype)


def test_plugin_lowering_has_one_plugin_node_per_layer_and_ootb_none(tmp_path: Path) -> None:
    import onnx

    config = TINY_CONFIGS[0]
    for moe_plugin in (False, True):
        out = tmp_path / str(moe_plugin)
        _build(config, "float16", moe_plugin, out)
        graph = onnx.load(str(out / "onnx" / "rank0.onnx"), load_external_data=False).graph
        plugins = [node for node in graph.node if node.op_type == "MoE"]
        assert len(plugins) == (config.layers if moe_plugin else 0)
        assert all(node.domain == "trt.plugins" for node in plugins)
        # ootb: no data-dependent shapes (TensorRT-RTX builds neither NonZero nor its own MoE layer)
        assert not any(node.op_type in ("NonZero", "ScatterND", "Loop") for node in graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("config", TINY_CONFIGS[1:3], ids=[c.id for c in TINY_CONFIGS[1:3]])
def test_other_configs_build_and_match(config: TinyConfig, tmp_path: Path) -> None:
    for moe_plugin in (False, True):
        out = tmp_path / str(moe_plugin)
        _build(config, "float16", moe_plugin, out)
        _check_onnx_matches_torch(out, config, "float16")


def test_config_json_describes_the_build(tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    out = tmp_path / "engines"
    _build(config, "float16", True, out)
    written = json.loads((out / "config.json").read_text())
    info = tensorrt_info()
    assert written["format"] == "moec-tensorrt/1"
    assert written["tensorrt"] == {"flavour": info.flavour, "version": info.version}
    assert written["parallelism"] == {"world_size": 1}
    assert written["targets"] == list(TARGETS)
    assert written["plugin"] == {
        "name": "MoE", "version": "1", "namespace": "moec", "register": "backends.tensorrt.plugin:register_moe_plugin"
    }
    (entry,) = written["ranks"][0]["engines"]
    assert entry["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}]
    assert entry["outputs"] == [{"name": "logits", "dtype": "float16", "shape": [-1, -1, config.vocab]}]
    assert entry["profiles"] == [{"input_ids": {"min": [1, 1], "opt": [1, 16], "max": [2, 16]}}]
    assert written["build_seconds"] >= entry["build_seconds"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "onnx", "rank0.engine"]


def test_two_environments_get_two_library_links_and_a_changed_link_is_mended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two environments of one TensorRT-RTX version: same version string, two library files.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    libraries = [tmp_path / env / "libtensorrt_rtx.so.1" for env in ("venvA", "venvB")]
    for library in libraries:
        library.parent.mkdir()
        library.write_bytes(b"a library")
    directories = [link_library(library, "tensorrt_rtx-1.7.1.116") for library in libraries]
    assert directories[0] != directories[1]
    for directory, library in zip(directories, libraries):
        assert os.readlink(directory / "libtensorrt_rtx.so") == str(library)
    # venvB's link edited to name venvA's library: the next use points it back at venvB's own.
    link = directories[1] / "libtensorrt_rtx.so"
    link.unlink()
    link.symlink_to(libraries[0])
    assert link_library(libraries[1], "tensorrt_rtx-1.7.1.116") == directories[1]
    assert os.readlink(link) == str(libraries[1])
    assert sorted(p.name for p in directories[1].iterdir()) == ["libtensorrt_rtx.so"]


@pytest.mark.skipif(not TARGETS, reason="only TensorRT-RTX parses plugins through the libtensorrt_rtx.so link")
@pytest.mark.parametrize("stale", ["another-environment", "dangling"])
def test_plugin_build_replaces_a_stale_library_link(
    stale: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_rtx_libs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    own_library = (Path(tensorrt_rtx_libs.__file__).parent / "libtensorrt_rtx.so.1").resolve()
    link = plugin_library_dir() / "libtensorrt_rtx.so"
    assert os.readlink(link) == str(own_library)
    # What another environment leaves behind: a link to its library (a build process that loads it beside its own
    # crashes; this stand-in is not even a library), or, once that environment is deleted, a dangling link.
    other = tmp_path / "venvA" / "libtensorrt_rtx.so.1"
    if stale == "another-environment":
        other.parent.mkdir()
        other.write_bytes(b"not this interpreter's TensorRT")
    link.unlink()
    link.symlink_to(other)
    out = tmp_path / "engines"
    built = _build(TINY_CONFIGS[1], "float16", True, out)
    assert built["moe_lowering"] == "plugin" and (out / "rank0.engine").stat().st_size > 100_000
    assert os.readlink(link) == str(own_library)


@pytest.mark.skipif(not TARGETS, reason="only TensorRT-RTX parses plugins through the libtensorrt_rtx.so link")
def test_an_install_without_its_library_is_refused_before_linking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_rtx_libs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tensorrt_rtx_libs, "__file__", str(tmp_path / "tensorrt_rtx_libs" / "__init__.py"))
    with pytest.raises(TensorRTUnavailableError) as error:
        plugin_library_dir()
    version = tensorrt_info().version
    assert str(error.value) == (
        f"tensorrt_rtx {version} is installed without its library {tmp_path / 'tensorrt_rtx_libs'}/libtensorrt_rtx.so.1"
    )
    assert not (tmp_path / "cache").exists()


def test_plugin_attributes_are_serialized_into_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    _build(TINY_CONFIGS[0], "bfloat16", True, out)
    engine = (out / "rank0.engine").read_bytes()
    for text in (b"moec", b"num_experts", b"top_k", b"normalization", b"swiglu", b"bfloat16"):
        assert text in engine


def test_plugin_creator_round_trips_its_fields() -> None:
    from backends.tensorrt.plugin import MoEPluginCreator, register_moe_plugin

    creator = register_moe_plugin()
    assert register_moe_plugin() is creator
    values = {
        "num_experts": 8, "num_local_experts": 4, "top_k": 2, "normalization": "renormalize", "activation": "swiglu",
        "dtype": "float16", "expert_offset": 4, "precision": "", "group_size": 0, "w13_input_scale": 1.0,
        "w2_input_scale": 1.0,
    }
    from backends.tensorrt.plugin import _EncodedFields

    encoded = _EncodedFields(values)
    plugin = MoEPluginCreator().create_plugin("moe", encoded.collection, None)
    assert plugin.values == values
    assert (plugin.plugin_name, plugin.plugin_version, plugin.plugin_namespace) == ("MoE", "1", "moec")
    clone = MoEPluginCreator().create_plugin("moe", plugin.get_fields_to_serialize(), None)
    assert clone.values == values
    with pytest.raises(ValueError, match="normalization 'softmax'"):
        bad = _EncodedFields({**values, "normalization": "softmax"})
        MoEPluginCreator().create_plugin("moe", bad.collection, None)
    with pytest.raises(ValueError, match=r"num_experts=8, num_local_experts=4, expert_offset=5$"):
        bad = _EncodedFields({**values, "expert_offset": 5})
        MoEPluginCreator().create_plugin("moe", bad.collection, None)
    quantized = {**values, "precision": "int4", "group_size": 16}
    assert MoEPluginCreator().create_plugin("moe", _EncodedFields(quantized).collection, None).values == quantized
    fp8_values = {**values, "precision": "fp8", "w13_input_scale": 0.25, "w2_input_scale": 0.125}
    assert MoEPluginCreator().create_plugin("moe", _EncodedFields(fp8_values).collection, None).values == fp8_values
    with pytest.raises(ValueError, match="precision 'nf4' not in"):
        MoEPluginCreator().create_plugin("moe", _EncodedFields({**values, "precision": "nf4"}).collection, None)
    with pytest.raises(ValueError, match="input scales 0.0, 0.125 not positive"):
        MoEPluginCreator().create_plugin("moe", _EncodedFields({**fp8_values, "w13_input_scale": 0.0}).collection,
                                         None)


@pytest.mark.parametrize("precision,group_size,offset", [("int8", 0, 0), ("int4", 16, 0), ("int4", 0, 2)])
def test_plugin_computes_quantized_experts_as_the_torch_backend(precision: str, group_size: int, offset: int) -> None:
    """The plugin's plumbing (`moe_forward`, what `enqueue` runs on TensorRT's buffers): int4 codes arriving as int8
    bytes, the fields, an expert block's offset, give `moec.quantized_moe`'s result. On the CPU both sides run the
    same reference arithmetic, so this checks the plugin's handling of its operands, not the arithmetic; the GPU runs
    `fused_moe` on the same operands, which tests/backends/test_triton_quantized.py checks against the reference."""
    from backends.tensorrt.plugin import moe_forward
    from compiler.quantization import quantize

    gen = torch.Generator().manual_seed(5)
    experts, hidden, inter = 4, 32, 48
    x = torch.randn(3, 5, hidden, generator=gen)
    router = torch.randn(experts, hidden, generator=gen)
    w13, s13 = quantize(torch.randn(experts, 2 * inter, hidden, generator=gen) / 6, precision, group_size)
    w2, s2 = quantize(torch.randn(experts, hidden, inter, generator=gen) / 7, precision, group_size)
    local = slice(offset, experts)
    expected = torch.ops.moec.quantized_moe(x, router, w13[local], s13[local], w2[local], s2[local], 2, "renormalize",
                                            "swiglu", precision, group_size, offset)
    values = {"top_k": 2, "normalization": "renormalize", "expert_offset": offset, "precision": precision,
              "group_size": group_size}
    as_trt = (lambda w: w.view(torch.int8)) if precision == "int4" else (lambda w: w)
    out = torch.empty_like(x)
    moe_forward(x, router, as_trt(w13[local]), as_trt(w2[local]), values, out, (s13[local], s2[local]))
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"{precision} experts need their scales"):
        moe_forward(x, router, as_trt(w13), as_trt(w2), {**values, "expert_offset": 0}, out)


@pytest.mark.parametrize("offset", [0, 1])
def test_plugin_computes_fp8_experts_as_the_torch_backend(offset: int) -> None:
    """FP8 experts through the plugin's plumbing (e4m3 bytes arriving as int8, per-expert scales, the static input
    scales from its fields, an expert block's offset) give `moec.fp8_moe`'s result bit for bit (both sides run
    `fp8_experts_reference` on the CPU: a wrong byte view, scale field or offset would change it)."""
    from backends.tensorrt.plugin import moe_forward
    from compiler import fp8

    gen = torch.Generator().manual_seed(6)
    experts, hidden, inter = 4, 32, 48
    x = torch.randn(2, 7, hidden, generator=gen)
    router = torch.randn(experts, hidden, generator=gen)
    pairs13 = [fp8.quantize_tensor(torch.randn(2 * inter, hidden, generator=gen) / 6) for _ in range(experts)]
    pairs2 = [fp8.quantize_tensor(torch.randn(hidden, inter, generator=gen) / 7) for _ in range(experts)]
    w13, s13 = torch.stack([p[0] for p in pairs13])[offset:], torch.stack([p[1] for p in pairs13])[offset:]
    w2, s2 = torch.stack([p[0] for p in pairs2])[offset:], torch.stack([p[1] for p in pairs2])[offset:]
    in_scale, mid_scale = float(x.abs().max()) / 448, 0.02
    expected = torch.ops.moec.fp8_moe(x, router, w13, s13, w2, s2, 2, "renormalize", "swiglu", in_scale, mid_scale,
                                      offset)
    values = {"top_k": 2, "normalization": "renormalize", "expert_offset": offset, "precision": "fp8",
              "group_size": 0, "w13_input_scale": in_scale, "w2_input_scale": mid_scale}
    out = torch.empty_like(x)
    moe_forward(x, router, w13.view(torch.int8), w2.view(torch.int8), values, out, (s13, s2))
    assert torch.equal(out, expected)


@pytest.mark.skipif(not TARGETS, reason="only TensorRT-RTX takes --target")
def test_unsupported_target_is_refused() -> None:
    info = tensorrt_info()
    with pytest.raises(TargetError) as error:
        build_options(targets="sm89,sm90")
    assert str(error.value) == (
        f"target sm90 is not supported by {info.flavour} {info.version} (it builds for {', '.join(info.targets)})"
    )


def test_op_tensorrt_cannot_take_names_the_op_and_pass_and_leaves_nothing(tmp_path: Path) -> None:
    # Without decomposing attention, the ONNX `Attention` carries softmax_precision, which TensorRT rejects.
    out = tmp_path / "engines"
    with pytest.raises(TensorRTBuildError) as error:
        _build(TINY_CONFIGS[0], "float16", False, out, decompose=())
    message = str(error.value)
    assert "ONNX node attention/Attention_" in message
    assert "from fx node attention (moec.attention, produced by trace)" in message
    assert "softmax precision is not supported" in message
    assert list(tmp_path.iterdir()) == []


def test_existing_foreign_directory_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MoecError, match="exists and is not empty"):
        _build(TINY_CONFIGS[1], "float16", False, out)
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _sharded(spec: str, dtype: str) -> Program:
    return run_pipeline(program(TINY_CONFIGS[0], dtype), parse_pipeline(spec)).program


def test_tensor_parallel_ranks_split_at_collectives_and_match_torch(tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    out = tmp_path / "engines"
    options = BuildOptions(targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True, workers=2)
    built = build_engines(_sharded("shard{tp=2}", "float32"), out, options, progress=lambda line: None).config
    assert built["parallelism"] == {"world_size": 2, "tp": 2, "pp": 1, "moe_tp": 2, "moe_ep": 1}
    for rank in built["ranks"]:
        # per layer: all_reduce after attention and after moe; plus the vocab-parallel embedding and lm_head
        kinds = [step.get("collective", "engine") for step in rank["steps"]]
        assert kinds == ["engine", "all_reduce"] * (2 * config.layers + 1) + ["engine", "all_gather"]
        assert [engine["file"] for engine in rank["engines"]] == [f"rank{rank['rank']}.seg{i}.engine" for i in range(6)]
        assert all((out / engine["file"]).stat().st_size > 0 for engine in rank["engines"])
    moe_input = next(e for e in built["ranks"][0]["engines"] if e["inputs"][-1]["shape"] == [-1, config.hidden])
    assert moe_input["profiles"][0][moe_input["inputs"][-1]["name"]]["max"] == [2 * 16, config.hidden]
    reference = TorchExecutable(program(config, "float32"))
    ids = input_ids(config, 2, 7)
    for logits in simulate_ranks(out, ids.numpy()):
        assert max_rel_err(torch.from_numpy(logits), reference(ids)) <= TOLERANCE["float32"]


@pytest.mark.slow
def test_pipeline_parallel_ranks_send_and_receive_and_match_torch(tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    out = tmp_path / "engines"
    options = BuildOptions(moe_plugin=True, targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True)
    built = build_engines(_sharded("shard{tp=1,pp=2}", "float16"), out, options, progress=lambda line: None).config
    assert [[step.get("collective", "engine") for step in rank["steps"]] for rank in built["ranks"]] == [
        ["engine", "send"], ["recv", "engine"]
    ]
    ids = input_ids(config, 2, 7)
    token, logits = simulate_ranks(out, ids.numpy())
    assert token.shape == (0,)
    expected = TorchExecutable(program(config, "float16"))(ids)
    assert max_rel_err(torch.from_numpy(logits).float(), expected.float()) <= TOLERANCE["float16"]


@pytest.mark.parametrize("moe_plugin", [False, True], ids=["ootb", "plugin"])
def test_expert_parallel_ranks_build_and_match_torch(moe_plugin: bool, tmp_path: Path) -> None:
    config = TINY_CONFIGS[0]
    out = tmp_path / "engines"
    options = BuildOptions(moe_plugin=moe_plugin, targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True, workers=2)
    built = build_engines(_sharded("shard{tp=2,moe_ep=2}", "float32"), out, options, progress=lambda line: None).config
    assert built["parallelism"] == {"world_size": 2, "tp": 2, "pp": 1, "moe_tp": 1, "moe_ep": 2}
    assert all((out / engine["file"]).stat().st_size > 0 for rank in built["ranks"] for engine in rank["engines"])
    ids = input_ids(config, 2, 7)
    expected = TorchExecutable(program(config, "float32"))(ids)
    for logits in simulate_ranks(out, ids.numpy()):
        assert max_rel_err(torch.from_numpy(logits), expected) <= TOLERANCE["float32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_loader_refuses_without_gpu(tmp_path: Path) -> None:
    from backends.tensorrt import load_engines

    out = tmp_path / "engines"
    _build(TINY_CONFIGS[1], "float16", False, out)
    info = tensorrt_info()
    with pytest.raises(EngineRunError) as error:
        load_engines(out)
    assert str(error.value) == (
        f"cannot run engines built by {info.flavour} {info.version}: no CUDA GPU is visible here "
        "(torch.cuda.is_available() is False)"
    )


def test_loader_refuses_other_tensorrt_version(tmp_path: Path) -> None:
    from backends.tensorrt import load_engines

    out = tmp_path / "engines"
    _build(TINY_CONFIGS[1], "float16", False, out)
    written = json.loads((out / "config.json").read_text())
    written["tensorrt"]["version"] = "0.0.1"
    (out / "config.json").write_text(json.dumps(written))
    info = tensorrt_info()
    with pytest.raises(EngineRunError, match=f"with {info.flavour} {info.version}: an engine only deserializes"):
        load_engines(out)


def test_cli_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["build", "tiny", "--output-dir", str(out), "--dtype", "float16", "--moe-plugin", "enable"]
    argv += ["--max-seq", "32"]
    if TARGETS:
        argv += ["--target", ",".join(TARGETS)]
    assert cli.main(argv) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["passes"] == ["canonicalize", "fuse-moe", "dce"]
    assert (written["dtype"], written["moe_lowering"]) == ("float16", "plugin")
    printed = capsys.readouterr().out
    assert "[rank 1/1] engine " in printed and f"{out / 'rank0.engine'}" in printed


def test_cli_build_bad_option_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["build", "tiny", "--output-dir", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "moec: error: --workers must be >= 1, got 0\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("normalization", ["none", "renormalize"])
@pytest.mark.parametrize("expert_offset", [0, 2])
def test_plugin_computation_matches_torch_backend_moe(normalization: str, expert_offset: int) -> None:
    from backends.tensorrt.plugin import moe_forward

    generator = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 7, 16, 24, 4, 2
    x = torch.randn(2, tokens, hidden, generator=generator)
    router = torch.randn(experts, hidden, generator=generator)
    local = experts - expert_offset if expert_offset else experts
    w13 = torch.randn(local, 2 * inter, hidden, generator=generator) / 4
    w2 = torch.randn(local, hidden, inter, generator=generator) / 4
    values = {"num_experts": experts, "num_local_experts": local, "top_k": top_k, "normalization": normalization,
              "activation": "swiglu", "dtype": "float32", "expert_offset": expert_offset}
    out = torch.empty_like(x)
    moe_forward(x, router, w13, w2, values, out)
    # Independent dense form: every local expert on every token, weighted by its routing weight (0 if not chosen).
    flat = x.reshape(-1, hidden)
    weights, chosen = torch.topk(torch.softmax(flat @ router.T, dim=-1), top_k, dim=-1)
    if normalization == "renormalize":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    expected = torch.zeros_like(flat)
    for e in range(local):
        gate_up = flat @ w13[e].T
        expert_out = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].T
        weight = (weights * (chosen == e + expert_offset)).sum(dim=-1, keepdim=True)
        expected += weight * expert_out
    assert max_rel_err(out, expected.reshape(x.shape)) <= 1e-5


def test_compile_with_the_tensorrt_backend_builds_engines_and_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    from compiler.api import compile

    config = TINY_CONFIGS[0]
    compiled = compile(
        hf_model(config),
        backend="tensorrt",
        backend_options={"output_dir": tmp_path / "engines", "moe_plugin": True, "targets": "sm89", "max_seq": 16},
    )
    written = json.loads((tmp_path / "engines" / "config.json").read_text())
    assert written["dtype"] == "float32"
    # Without `passes`, engines come from ENGINE_PIPELINE, not from the default pipeline (which may hold kv-cache).
    assert written["passes"] == [record.spec for record in compiled.history] == ["canonicalize", "fuse-moe", "dce"]
    assert sorted(p.name for p in (tmp_path / "engines").glob("*.engine")) == ["rank0.engine"]
    assert compiled.engine_dir == str(tmp_path / "engines")
    if not torch.cuda.is_available():
        with pytest.raises(EngineRunError, match=r"no CUDA GPU is visible here \(torch.cuda.is_available\(\) is False\)"):
            compiled(input_ids(config, 1, 4))


def test_compile_with_the_tensorrt_backend_needs_an_output_dir() -> None:
    from compiler.api import compile

    with pytest.raises(MoecError, match=r"backend='tensorrt' needs backend_options=\{'output_dir': DIR\}"):
        compile("tiny", backend="tensorrt")


DECODER_PIPELINE = "canonicalize,fuse-moe,kv-cache{max_seq=32},dce"


@lru_cache(maxsize=None)
def decoder_program(config: TinyConfig, dtype: str) -> Program:
    return run_pipeline(load(hf_model(config), dtype=dtype), parse_pipeline(DECODER_PIPELINE)).program


def _teacher_forced_logits(decoder: object, prompts: list[list[int]], sequences: list[list[int]]) -> list[np.ndarray]:
    """The decoder's logits at every step when fed `sequences`' generated tokens (left-padded prompts), so that an
    fp16 near-tie cannot send the two runs down different paths."""
    longest = max(len(p) for p in prompts)
    ids = np.array([[0] * (longest - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past = decoder.empty_past(len(prompts))
    steps = len(sequences[0]) - len(prompts[0])
    generated = np.array([s[len(p):] for p, s in zip(prompts, sequences)], dtype=np.int64)
    logits_per_step = []
    for step in range(steps):
        logits, past = decoder.step(ids, mask, positions, past)
        logits_per_step.append(logits[:, -1].astype(np.float32))
        ids = generated[:, step : step + 1]
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
    return logits_per_step


@pytest.mark.parametrize("moe_plugin", [False, True], ids=["ootb", "plugin"])
def test_decoder_engines_have_context_and_generation_profiles_and_their_onnx_matches_torch(
    moe_plugin: bool, tmp_path: Path
) -> None:
    from backends.tensorrt.verify import onnxruntime_decoder
    from tests.backends.test_onnx_decoder import torch_reference

    config = TINY_CONFIGS[0]
    program = decoder_program(config, "float16")
    out = tmp_path / "engines"
    options = BuildOptions(moe_plugin=moe_plugin, targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True)
    built = build_engines(program, out, options, progress=lambda line: None).config
    assert (out / "rank0.engine").stat().st_size > 100_000
    kv, head = config.kv_heads, config.hidden // config.heads
    assert built["kv_cache"]["max_seq"] == 32
    assert [p["name"] for p in built["kv_cache"]["profiles"]] == ["context", "generation"]
    (entry,) = built["ranks"][0]["engines"]
    past_names = [f"past_key_values.{layer}.{kind}" for layer in range(config.layers) for kind in ("key", "value")]
    assert [i["name"] for i in entry["inputs"]] == ["input_ids", "attention_mask", "position_ids", *past_names]
    present_names = [name.replace("past_key_values", "present") for name in past_names]
    assert [o["name"] for o in entry["outputs"]] == ["logits", *present_names]
    assert [o["shape"] for o in entry["outputs"]] == [[-1, -1, config.vocab]] + [[-1, kv, -1, head]] * len(past_names)
    context, generation = entry["profiles"]  # as TensorRT's profile objects hold them
    assert context["input_ids"] == {"min": [1, 1], "opt": [1, 16], "max": [2, 16]}
    empty = [1, kv, 0, head]
    assert context["past_key_values.0.key"] == {"min": empty, "opt": empty, "max": [2, kv, 0, head]}
    assert generation["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 1]}
    assert generation["attention_mask"] == {"min": [1, 2], "opt": [1, 16], "max": [2, 16]}
    assert generation["past_key_values.1.value"] == {
        "min": [1, kv, 1, head], "opt": [1, kv, 15, head], "max": [2, kv, 15, head]
    }
    assert all(set(profile) == {i["name"] for i in entry["inputs"]} for profile in entry["profiles"])
    # The file TensorRT parsed, in onnxruntime, against torch: prefill + 8 decode steps, batch 2 of two lengths.
    prompts = [input_ids(config, 1, 6)[0].tolist(), input_ids(config, 1, 3, seed=2)[0].tolist()]
    sequences, expected = torch_reference(program, prompts, steps=9)
    actual = _teacher_forced_logits(onnxruntime_decoder(out / "onnx" / "rank0.onnx"), prompts, sequences)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(torch.from_numpy(got), want.float()) <= TOLERANCE["float16"], f"step {step}"


def test_decoder_engines_past_max_seq_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    options = BuildOptions(targets=TARGETS, max_batch=2, max_seq=64)
    with pytest.raises(MoecError) as error:
        build_engines(decoder_program(TINY_CONFIGS[0], "float16"), out, options, progress=lambda line: None)
    assert str(error.value) == (
        "--max-seq 64 exceeds the program's KV cache length (kv-cache max_seq 32): past_seq + seq may not pass it; "
        "lower --max-seq or raise kv-cache{max_seq=N}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_loader_refuses_decoder_engines_without_gpu(tmp_path: Path) -> None:
    from backends.tensorrt import load_engines

    out = tmp_path / "engines"
    options = BuildOptions(targets=TARGETS, max_batch=1, max_seq=8)
    build_engines(decoder_program(TINY_CONFIGS[1], "float16"), out, options, progress=lambda line: None)
    with pytest.raises(EngineRunError, match=r"no CUDA GPU is visible here \(torch.cuda.is_available\(\) is False\)$"):
        load_engines(out)


@pytest.mark.parametrize("moe_plugin", [False, True], ids=["ootb", "plugin"])
def test_sharded_decoder_engines_build_and_their_onnx_generates_the_unsharded_tokens(
    moe_plugin: bool, tmp_path: Path
) -> None:
    from backends.onnx.decoder import greedy_generate
    from backends.tensorrt.verify import decoder_ranks
    from tests.backends.test_onnx_decoder import torch_reference

    config = TINY_CONFIGS[0]
    pipeline = DECODER_PIPELINE.replace("kv-cache", "shard{tp=2,moe_ep=2},kv-cache")
    sharded = run_pipeline(load(hf_model(config), dtype="float32"), parse_pipeline(pipeline)).program
    out = tmp_path / "engines"
    options = BuildOptions(moe_plugin=moe_plugin, targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True, workers=2)
    built = build_engines(sharded, out, options, progress=lambda line: None).config
    assert built["parallelism"] == {"world_size": 2, "tp": 2, "pp": 1, "moe_tp": 1, "moe_ep": 2}
    for rank in built["ranks"]:
        attention = [e for e in rank["engines"] if any(i["name"] == "attention_mask" for i in e["inputs"])]
        assert len(attention) == config.layers  # one engine per layer's attention, each with its own caches
        assert all(len(e["profiles"]) == 2 for e in attention)
        assert all(len(e["profiles"]) == 1 for e in rank["engines"] if e not in attention)
        assert [o["shape"] for o in attention[0]["outputs"]][1:] == [[-1, config.kv_heads // 2, -1, 8]] * 2
    prompts = [input_ids(config, 1, 6)[0].tolist(), input_ids(config, 1, 3, seed=2)[0].tolist()]
    expected_sequences, expected_logits = torch_reference(decoder_program(config, "float32"), prompts, steps=8)
    result = greedy_generate(decoder_ranks(out, config.vocab), prompts, 8)
    assert result.sequences == expected_sequences
    for step, (actual, expected) in enumerate(zip(result.logits, expected_logits)):
        assert max_rel_err(torch.from_numpy(actual), expected) <= TOLERANCE["float32"], f"step {step}"


def test_cli_build_kv_cache_builds_decoder_engines(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["build", "tiny", "--output-dir", str(out), "--dtype", "float16", "--kv-cache", "--max-seq", "16"]
    if TARGETS:
        argv += ["--target", ",".join(TARGETS)]
    assert cli.main(argv) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["passes"] == ["canonicalize", "fuse-moe", "kv-cache{max_seq=16}", "dce"]
    assert written["kv_cache"]["max_seq"] == 16
    assert [p["name"] for p in written["kv_cache"]["profiles"]] == ["context", "generation"]
    assert len(written["ranks"][0]["engines"][0]["profiles"]) == 2
    assert cli.main(["build", "tiny", "--output-dir", str(out), "--kv-cache", "--passes", "canonicalize"]) == 2


def test_cli_build_with_the_recipe_quantization_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TensorRT-LLM's `--use_weight_only --weight_only_precision int4 --group_size 32` on `moec build`: the pipeline
    gains quantize-weights (printed), the engine builds from the out-of-the-box form and with the MoE plugin
    (quantized experts as its inputs)."""
    out = tmp_path / "int4"
    argv = ["build", "tiny", "--output-dir", str(out), "--dtype", "float16", "--max-seq", "32",
            "--use_weight_only", "--weight_only_precision", "int4", "--group_size", "32"]
    if TARGETS:
        argv += ["--target", ",".join(TARGETS)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "pipeline: canonicalize,fuse-moe,quantize-weights{precision=int4,group_size=32},dce" in captured.err
    written = json.loads((out / "config.json").read_text())
    assert written["passes"] == ["canonicalize", "fuse-moe", "quantize-weights{precision=int4,group_size=32}", "dce"]
    assert (out / "rank0.engine").stat().st_size > 0
    plugin = ["build", "tiny", "--output-dir", str(tmp_path / "plugin"), "--dtype", "float16", "--max-seq", "32",
              "--moe-plugin", "enable", "--use-weight-only"]
    if TARGETS:
        plugin += ["--target", ",".join(TARGETS)]
    assert cli.main(plugin) == 0
    written = json.loads((tmp_path / "plugin" / "config.json").read_text())
    assert written["moe_lowering"] == "plugin" and "quantize-weights" in written["passes"]
    assert (tmp_path / "plugin" / "rank0.engine").stat().st_size > 0


def test_decoder_engine_of_a_fuse_rope_program_builds_and_its_onnx_matches_torch(tmp_path: Path) -> None:
    """`moec.rope_cached_attention` reaches TensorRT as the rope lowering, then the cached attention's."""
    from backends.tensorrt.verify import onnxruntime_decoder
    from tests.backends.test_onnx_decoder import torch_reference

    config = TINY_CONFIGS[0]
    program = run_pipeline(decoder_program(config, "float16"), parse_pipeline("fuse-rope")).program
    assert program.op_counts()["moec.rope_cached_attention"] == config.layers
    out = tmp_path / "engines"
    options = BuildOptions(moe_plugin=False, targets=TARGETS, max_batch=2, max_seq=16, keep_onnx=True)
    build_engines(program, out, options, progress=lambda line: None)
    assert (out / "rank0.engine").stat().st_size > 100_000
    prompts = [input_ids(config, 1, 6)[0].tolist(), input_ids(config, 1, 3, seed=2)[0].tolist()]
    sequences, expected = torch_reference(program, prompts, steps=5)
    assert sequences == torch_reference(decoder_program(config, "float16"), prompts, steps=5)[0]
    actual = _teacher_forced_logits(onnxruntime_decoder(out / "onnx" / "rank0.onnx"), prompts, sequences)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert max_rel_err(torch.from_numpy(got), want.float()) <= TOLERANCE["float16"], f"step {step}"
