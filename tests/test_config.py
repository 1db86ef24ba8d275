from __future__ import annotations

import tomllib

import pytest

from bedside.errors import ModelLoadError
from bedside.modelconfig.graph import GraphTensor, check_against_graph, infer_config
from bedside.modelconfig.model import VersionPolicy, load_config, parse_config
from tests.models import SCALE_CONFIG


def config(text: str = SCALE_CONFIG, name: str = "scale"):
    return parse_config(tomllib.loads(text), name)


def test_parses_a_full_config():
    cfg = config(
        """
instances = 2
threads = 1
execution_providers = ["cuda", "cpu"]
version_policy = { specific = [1, 3] }
warmup = { batch_sizes = [1, 4], fill = "random" }
"""
        + SCALE_CONFIG
    )
    assert cfg.max_batch_size == 8
    assert cfg.inputs[0].shape == (4,)
    assert cfg.full_shape(cfg.inputs[0]) == (-1, 4)
    assert cfg.instances == 2 and cfg.threads == 1
    assert cfg.execution_providers == ("cuda", "cpu")
    assert cfg.version_policy.select([1, 2, 3, 4]) == [1, 3]
    assert cfg.warmup is not None and cfg.warmup.batch_sizes == (1, 4) and cfg.warmup.fill == "random"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour = 'red'", "unknown config keys: colour"),
        ("instances = 0", "instances must be an integer >= 1"),
        ("execution_providers = ['quantum']", "execution_providers"),
        ("platform = 'tensorflow'", "platform 'tensorflow' is not supported"),
        ("name = 'other'", "differs from its folder"),
        ("[version_policy]\nlatest = 0", "latest must be a positive integer"),
        ("[version_policy]\nlatest = 1\nall = true", "version_policy takes one of"),
        ("[warmup]\nfill = 'ones'", "warmup.fill"),
        ("scheduling = { reserved_instances = 1 }", "leaves no instance for routine work"),
        ("scheduling = { default_priority = 4 }", "above priority_levels"),
        ("dynamic_batching = { max_queue_delay = 5 }", "dynamic_batching has unknown keys max_queue_delay"),
        ("tenants = { icu = { share = 0 } }", "tenants.icu.share must be a positive number"),
        ("[[queue_policy]]\nlevel = 2\ntimeout_action = 'drop'", "timeout_action must be 'reject' or 'delay'"),
    ],
)
def test_rejects_bad_configs_with_a_reason(extra, message):
    with pytest.raises(ModelLoadError, match=message):
        config(extra + "\n" + SCALE_CONFIG if not extra.startswith("[") else SCALE_CONFIG + extra)


def test_rejects_bad_tensor_specs():
    with pytest.raises(ModelLoadError, match=r"outputs .y. has unknown keys instances; .* above the first"):
        config(SCALE_CONFIG + "instances = 2")
    with pytest.raises(ModelLoadError, match="datatype 'FLOAT'"):
        config(SCALE_CONFIG.replace('"FP32"', '"FLOAT"', 1))
    with pytest.raises(ModelLoadError, match="shape must list positive sizes or -1"):
        config(SCALE_CONFIG.replace("shape = [4]", "shape = [0]", 1))
    with pytest.raises(ModelLoadError, match="needs \\[\\[inputs\\]\\]"):
        config("max_batch_size = 1")


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("max_batch_size = = 3")
    with pytest.raises(ModelLoadError, match="is not valid TOML"):
        load_config(path, "m")


def test_version_policies():
    assert VersionPolicy(latest=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(latest=None, all=True).select([3, 1]) == [1, 3]
    assert VersionPolicy(latest=None, specific=(5,)).select([1, 2]) == []


def test_infers_a_batching_config_from_the_graph():
    cfg = infer_config("m", [GraphTensor("x", "FP32", (-1, 12, 2500))], [GraphTensor("p", "FP32", (-1, 5))])
    assert cfg.inferred and cfg.max_batch_size > 0
    assert cfg.inputs[0].shape == (12, 2500) and cfg.outputs[0].shape == (5,)
    fixed = infer_config("m", [GraphTensor("x", "FP32", (1, 3))], [GraphTensor("y", "FP32", (1, 3))])
    assert fixed.max_batch_size == 0 and fixed.inputs[0].shape == (1, 3)


def test_graph_check_catches_each_kind_of_mismatch():
    graph_in, graph_out = [GraphTensor("x", "FP32", (-1, 4))], [GraphTensor("y", "FP32", (-1, 4))]
    check_against_graph(config(), graph_in, graph_out)  # consistent: no error
    with pytest.raises(ModelLoadError, match="config says FP64, the graph has FP32"):
        check_against_graph(config(SCALE_CONFIG.replace('"FP32"', '"FP64"', 1)), graph_in, graph_out)
    with pytest.raises(ModelLoadError, match="dimension 1 is 5 in the config but 4"):
        check_against_graph(config(SCALE_CONFIG.replace("shape = [4]", "shape = [5]", 1)), graph_in, graph_out)
    with pytest.raises(ModelLoadError, match="has rank 3"):
        check_against_graph(config(SCALE_CONFIG.replace("shape = [4]", "shape = [4, 1]", 1)), graph_in, graph_out)
    with pytest.raises(ModelLoadError, match="graph inputs \\['mask'\\] are not in the config"):
        check_against_graph(config(), [*graph_in, GraphTensor("mask", "BOOL", (-1, 4))], graph_out)
    with pytest.raises(ModelLoadError, match="config output 'y' is not in the ONNX graph"):
        check_against_graph(config(), graph_in, [GraphTensor("z", "FP32", (-1, 4))])
    with pytest.raises(ModelLoadError, match="fixed at 1, so it cannot batch"):
        check_against_graph(config(), [GraphTensor("x", "FP32", (1, 4))], graph_out)
