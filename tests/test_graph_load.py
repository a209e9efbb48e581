"""Safe loading: every refusal rule, driven through the real CLI (`shapscan inspect`)."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from conftest import FEWSHOT, zoo_model
from graph_builders import conv_relu_model, model, save, tensor
from onnx import TensorProto, helper, numpy_helper

from scanner.errors import ModelRefused
from scanner.findings import Severity
from scanner.graph.load import _toposort_checked, load_model


def assert_refused(result, rule_id: str, tmp_path, before: set) -> None:
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert rule_id in lines[0]
    assert "Traceback" not in result.err + result.out
    assert set(tmp_path.rglob("*")) == before, "refusal left a file behind"


@pytest.fixture
def refused(run_cli, tmp_path):
    def _check(proto_or_path, rule_id: str, *args: str) -> str:
        path = proto_or_path
        if isinstance(proto_or_path, onnx.ModelProto):
            path = save(proto_or_path, tmp_path / "model.onnx")
        before = set(tmp_path.rglob("*"))
        result = run_cli("inspect", path, *args)
        assert_refused(result, rule_id, tmp_path, before)
        return result.err
    return _check


def test_valid_model_loads_with_inferred_shapes(tmp_path):
    loaded = load_model(save(conv_relu_model(), tmp_path / "m.onnx"))
    assert loaded.findings == []
    assert loaded.opset == 17
    assert any(v.name == "r" for v in loaded.proto.graph.value_info)
    assert len(loaded.sha256) == 64 and loaded.size_bytes == (tmp_path / "m.onnx").stat().st_size


def test_ss101_missing_and_garbage_files(refused, run_cli, tmp_path):
    with pytest.raises(ModelRefused) as info:
        load_model(tmp_path / "absent.onnx")
    assert info.value.rule_id == "SS101"
    # the CLI checks paths before loading: a missing one is a usage error (exit 4)
    assert run_cli("inspect", tmp_path / "absent.onnx").code == 4
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 this is not a protobuf \x12\x99" * 10)
    refused(garbage, "SS101")
    text = tmp_path / "text.onnx"
    text.write_text("hello")
    refused(text, "SS101")


def test_ss102_custom_domain(refused):
    proto = conv_relu_model()
    proto.graph.node[1].domain = "com.evil"
    proto.opset_import.append(helper.make_opsetid("com.evil", 1))
    err = refused(proto, "SS102")
    assert "relu" in err and "com.evil" in err


def test_onnx_training_domains_may_be_imported_but_not_used(refused, tmp_path):
    # onnxruntime's quant_pre_process writes these imports into every model it touches
    proto = conv_relu_model()
    proto.opset_import.extend([helper.make_opsetid("ai.onnx.training", 1),
                               helper.make_opsetid("ai.onnx.preview.training", 1)])
    assert load_model(save(proto, tmp_path / "m.onnx")).findings == []
    proto.graph.node[1].domain = "ai.onnx.preview.training"
    refused(proto, "SS102")


def test_ss102_allowed_domain_passes_the_domain_check(run_cli, tmp_path):
    proto = conv_relu_model()
    proto.graph.node[1].domain = "com.evil"
    proto.opset_import.append(helper.make_opsetid("com.evil", 1))
    path = save(proto, tmp_path / "m.onnx")
    # accepted by the domain rule, then the checker cannot verify the unknown op
    result = run_cli("inspect", path, "--allow-domain", "com.evil")
    assert "SS102" not in result.err


def _external(proto: onnx.ModelProto, location: str, offset: int = 0,
              length: int | None = None) -> onnx.ModelProto:
    init = proto.graph.initializer[0]
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        init.external_data.add(key=key, value=value)
    return proto


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../x.bin"])
def test_ss103_external_data_outside_the_model_folder(refused, tmp_path, location):
    err = refused(_external(conv_relu_model(), location, length=432), "SS103")
    assert "'w'" in err


@pytest.mark.parametrize("location,said", [
    ("w\x00.bin", "NUL byte"), ("a" * 5000, "(5000 chars)' cannot be resolved")])
def test_ss103_external_data_path_the_file_system_cannot_take(refused, location, said):
    err = refused(_external(conv_relu_model(), location, length=432), "SS103")
    assert said in err and len(err.splitlines()) == 1 and len(err) < 300


def test_ss103_symlink_escaping_the_folder(refused, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}_outside.bin"
    outside.write_bytes(b"\0" * 432)
    (tmp_path / "link.bin").symlink_to(outside)
    refused(_external(conv_relu_model(), "link.bin", length=432), "SS103")


def test_external_data_inside_the_folder_loads(tmp_path):
    proto = conv_relu_model()
    weights = numpy_helper.to_array(proto.graph.initializer[0])
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16 + weights.tobytes())
    path = save(_external(proto, "weights.bin", offset=16, length=weights.nbytes),
                tmp_path / "m.onnx")
    loaded = load_model(path)
    stored = next(t for t in loaded.proto.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(stored), weights)


def test_ss104_two_data_fields(refused):
    proto = conv_relu_model()
    init = proto.graph.initializer[0]  # raw_data set by from_array
    init.float_data.extend([0.0] * 108)
    err = refused(proto, "SS104")
    assert "raw_data" in err and "float_data" in err


def test_ss105_declared_size_larger_than_stored(refused):
    proto = conv_relu_model()
    proto.graph.initializer[0].dims[0] = 400
    refused(proto, "SS105")


def test_ss105_typed_field_count(refused):
    proto = conv_relu_model()
    bias = proto.graph.initializer[1]
    bias.ClearField("raw_data")
    bias.float_data.extend([1.0, 2.0])  # declares 4
    refused(proto, "SS105")


def test_ss105_external_data_past_end_of_file(refused, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 100)
    refused(_external(conv_relu_model(), "weights.bin", offset=0, length=432), "SS105")


def test_ss106_cycle(refused):
    nodes = [helper.make_node("Add", ["image", "b"], ["a"], name="add_a"),
             helper.make_node("Relu", ["a"], ["b"], name="relu_b"),
             helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1)]
    err = refused(model(nodes, [tensor("fc_w", [5, 3])]), "SS106")
    assert "cycle" in err


def test_ss107_dangling_input(refused):
    proto = conv_relu_model()
    proto.graph.node[1].input[0] = "ghost"
    err = refused(proto, "SS107")
    assert "ghost" in err and "relu" in err


def test_ss108_old_opset_is_converted(run_cli, tmp_path):
    path = save(conv_relu_model(opset=11), tmp_path / "old.onnx")
    loaded = load_model(path)
    assert loaded.opset == 17
    assert [(f.rule_id, f.severity) for f in loaded.findings] == [("SS108", Severity.INFO)]
    result = run_cli("inspect", path)
    assert result.code == 0, result.err
    assert "SS108" in result.out


def test_ss109_unconvertible_and_too_new_opsets(refused):
    proto = conv_relu_model(opset=11)
    proto.graph.node[1].op_type = "NoSuchOp"
    refused(proto, "SS109")
    refused(conv_relu_model(opset=99), "SS109")


def test_ss110_integer_image_input(refused):
    proto = conv_relu_model()
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    proto.graph.node.insert(0, helper.make_node("Cast", ["image_u8"], ["image_f"], to=1))
    proto.graph.input[0].name = "image_u8"
    proto.graph.node[1].input[0] = "image_f"
    err = refused(proto, "SS110")
    assert "image_u8" in err


def test_ss111_checker_failure(refused):
    proto = conv_relu_model()
    proto.graph.node[1].op_type = "NoSuchOp"
    refused(proto, "SS111")


def test_ss111_declared_shape_contradicts_inference(refused):
    proto = conv_relu_model()
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7  # Gemm gives 5
    refused(proto, "SS111")


def test_ss112_size_policy(tmp_path, run_cli):
    path = save(conv_relu_model(), tmp_path / "m.onnx")
    with pytest.raises(ModelRefused) as info:
        load_model(path, max_bytes=100)
    assert info.value.rule_id == "SS112"
    before = set(tmp_path.rglob("*"))
    assert_refused(run_cli("inspect", path, "--max-bytes", "100"), "SS112", tmp_path, before)


def test_loader_does_not_read_external_data_before_checking(tmp_path):
    # a refused path must be refused even if the file it names exists and is readable
    (tmp_path.parent / "shared.bin").write_bytes(b"\0" * 432)
    path = save(_external(conv_relu_model(), "../shared.bin", length=432), tmp_path / "m.onnx")
    with pytest.raises(ModelRefused) as info:
        load_model(path)
    assert info.value.rule_id == "SS103" and info.value.location == "w"


def test_ss105_hostile_dims_do_not_overflow(refused):
    proto = conv_relu_model()
    del proto.graph.initializer[0].dims[:]
    proto.graph.initializer[0].dims.extend([2**40, 2**40, 1, 1])
    refused(proto, "SS105")


def test_nodes_out_of_topological_order_are_reordered(tmp_path):
    proto = conv_relu_model()
    nodes = list(proto.graph.node)[::-1]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    loaded = load_model(save(proto, tmp_path / "m.onnx"))
    assert [n.name for n in loaded.proto.graph.node] == ["conv", "relu", "gap", "flatten", "fc"]


# Found by the loader fuzzer (benchmarks/fuzz_loader.py): each was a crash or a hang.

def test_ss103_external_data_through_a_loop_of_links(refused, tmp_path):
    # pathlib raises RuntimeError (not OSError) on a loop: an internal error before
    (tmp_path / "loop_a.bin").symlink_to("loop_b.bin")
    (tmp_path / "loop_b.bin").symlink_to("loop_a.bin")
    err = refused(_external(conv_relu_model(), "loop_a.bin", length=432), "SS103")
    assert "loop of symbolic links" in err


def test_long_chain_stored_in_reverse_sorts_in_linear_time(tmp_path):
    # the topological sort took rounds of "every ready node": quadratic (20,000 nodes stored
    # backwards: about 80 s, 30,000 ran past the fuzzer's 30 s limit); now about 1 s
    proto = conv_relu_model()
    n = 20_000
    relu = proto.graph.node[1]
    chain = [helper.make_node("Identity", [relu.input[0] if k == 0 else f"i{k - 1}"], [f"i{k}"])
             for k in range(n)]
    relu.input[0] = f"i{n - 1}"
    nodes = [proto.graph.node[0], *chain[::-1], *proto.graph.node[1:]]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    start = time.perf_counter()
    _toposort_checked(proto.graph)
    assert time.perf_counter() - start < 10
    assert [node.output[0] for node in proto.graph.node][1:n + 1] == [f"i{k}" for k in range(n)]
    assert load_model(save(proto, tmp_path / "m.onnx")).proto.graph.node[-1].name == "fc"


def test_ss106_cycle_found_by_the_linear_sort(refused):
    proto = conv_relu_model()
    proto.graph.node[1].input[0] = proto.graph.node[2].output[0]  # relu reads gap's output
    err = refused(proto, "SS106")
    assert "'relu'" in err


def test_ss107_no_graph_output(refused):
    # onnx.checker passes a graph without outputs; the scan then failed on outputs[0]
    proto = conv_relu_model()
    del proto.graph.output[:]
    assert "no graph output" in refused(proto, "SS107")


def test_ss109_future_opset_of_another_domain(refused):
    # only the default domain's opset was checked; onnxruntime refused ai.onnx.ml 99 mid-scan
    proto = conv_relu_model()
    proto.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99))
    assert "'ai.onnx.ml'" in refused(proto, "SS109")


@pytest.mark.parametrize("where", ["tensor", "node", "dimension", "bidi"])
def test_ss115_control_characters_in_names(refused, where):
    proto = conv_relu_model()
    if where == "tensor":  # a valid model, renamed everywhere: inspect printed a forged line
        forged = "r\nfindings: none"
        proto.graph.node[1].output[0] = forged
        proto.graph.node[2].input[0] = forged
    elif where == "node":
        proto.graph.node[0].name = "\x1b[2Kconv"
    elif where == "dimension":
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N\r"
    else:
        proto.graph.node[0].name = "conv\u202e"
    assert "control character" in refused(proto, "SS115")


def test_kernel_missing_on_cpu_is_inconclusive_not_a_crash(run_cli, tmp_path):
    # a valid graph onnxruntime's CPU build has no kernel for (Relu on int16): inspect
    # shows it, a scan ends inconclusive in one line (it was an internal error)
    proto = onnx.load(str(zoo_model("cnn_badnets")))
    graph = proto.graph
    at = [n.op_type for n in graph.node].index("Relu")
    relu = graph.node[at]
    source, target = relu.input[0], relu.output[0]
    relu.input[0], relu.output[0] = "as_int16", "relu_int16"
    graph.node.insert(at, helper.make_node("Cast", [source], ["as_int16"], to=TensorProto.INT16))
    graph.node.insert(at + 2, helper.make_node("Cast", ["relu_int16"], [target],
                                               to=TensorProto.FLOAT))
    path = save(proto, tmp_path / "m.onnx")
    assert run_cli("inspect", path).code == 0
    result = run_cli("scan", path, "--data", FEWSHOT, "--quiet")
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Could not find an implementation for Relu" in lines[0]


def test_ss103_external_data_through_a_link_inside_the_folder(refused, tmp_path):
    # onnx refuses any link with a ValidationError, which surfaced as an internal error
    (tmp_path / "weights.bin").write_bytes(b"\0" * 432)
    (tmp_path / "link.bin").symlink_to("weights.bin")
    err = refused(_external(conv_relu_model(), "link.bin", length=432), "SS103")
    assert "symbolic link" in err


def test_ss101_name_that_is_not_utf8(refused, tmp_path):
    # protobuf hands such a string over as bytes: the name checks raised TypeError
    proto = conv_relu_model()
    proto.graph.node[1].name = "QQQQ"
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString().replace(b"QQQQ", b"\xff\xfe\xff\xfe"))
    assert "onnx.NodeProto.name is not UTF-8" in refused(path, "SS101")


@pytest.mark.parametrize("lie", ["conv-group", "bias-shape"])
def test_ss116_what_only_onnxruntime_refuses(refused, lie):
    # onnx.checker and shape inference pass both; onnxruntime fails when it runs the node,
    # which was an internal error in the middle of a scan
    proto = conv_relu_model()
    if lie == "conv-group":
        proto.graph.node[0].attribute.append(helper.make_attribute("group", -1))
    else:
        proto.graph.initializer[3].dims.extend([1, 1])  # fc_b [5] -> [5, 1, 1]
    err = refused(proto, "SS116")
    assert "onnxruntime cannot run the model" in err
    assert "[ONNXRuntimeError]" not in err and ".cc:" not in err.split("Status Message")[0]
