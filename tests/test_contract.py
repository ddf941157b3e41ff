"""kvae.contract, the one home of the exported-file contract: names, manifest, metadata."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from bench_scripts import load_script

from kvae import contract

ROOT = Path(__file__).resolve().parents[1]


def test_file_names():
    assert contract.filename("encoder", "fp32", "onnx") == "encoder.onnx"
    assert contract.filename("decoder", "int8", "tflite") == "decoder.int8.tflite"
    names = {contract.filename(h, p, f) for h in contract.HALVES for p in contract.PRECISIONS
             for f in contract.FORMATS}
    assert len(names) == 12


CONTRACT_NAMES = ("HALVES", "PRECISIONS", "QUANTIZED", "FORMATS", "INPUT", "OUTPUTS", "CONDITION",
                  "inputs", "MANIFEST",
                  "filename", "sha256", "read_manifest", "update_manifest", "tflite_metadata",
                  "add_tflite_metadata", "onnx_metadata", "set_onnx_metadata")
SEAM_MODULES = ("export", "export_checks", "export_tflite", "export_onnx", "sessions", "runtime",
                "sample", "encode", "demo")


def test_everyone_uses_the_one_contract():
    """No second copy: the exporter, the runtime, the report and the benchmark take these names."""
    import kvae.demo
    import kvae.runtime

    modules = [importlib.import_module(f"kvae.{name}") for name in SEAM_MODULES]
    for module in modules:
        for name in CONTRACT_NAMES:  # a name a module has is the contract's own object
            assert getattr(module, name, getattr(contract, name)) is getattr(contract, name), (module, name)
    used = {name for module in modules for name in CONTRACT_NAMES if hasattr(module, name)}
    assert {"filename", "sha256", "update_manifest", "add_tflite_metadata", "set_onnx_metadata"} <= used
    assert kvae.runtime.SIGNATURES == {h: ((contract.INPUT[h],), contract.OUTPUTS[h]) for h in contract.HALVES}
    assert not hasattr(kvae.runtime, "sha256")
    assert "manifest.json" in kvae.demo.REQUIRED_EXPORTS
    latency = load_script("latency")
    assert latency.filename is contract.filename and latency.HALVES is contract.HALVES


def test_one_session_layer():
    """onnxruntime and LiteRT are opened in kvae/sessions.py only (the export self-check and the
    runtime share it); the tests and benchmarks that time or cross-check the raw runtimes on
    purpose live outside kvae/."""
    opened = {path.name for path in (ROOT / "kvae").glob("*.py")
              if "InferenceSession(" in path.read_text() or "Interpreter(" in path.read_text()}
    assert opened == {"sessions.py"}
    import kvae.export_checks

    assert not hasattr(kvae.export_checks, "LiteRTRunner") and not hasattr(kvae.export_checks, "ORTRunner")


def test_read_manifest(tmp_path):
    assert contract.read_manifest(tmp_path) == {}
    (tmp_path / "manifest.json").write_text('{"files": {}}')
    assert contract.read_manifest(tmp_path) == {"files": {}}
    (tmp_path / "manifest.json").write_text('{"files": ')
    with pytest.raises(ValueError, match=r"cannot read .*manifest\.json"):
        contract.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        contract.read_manifest(tmp_path)


def test_onnx_metadata_round_trip():
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["z"], ["x_mean"])], "g",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, [1, 2])])
    proto = helper.make_model(graph)
    proto.metadata_props.add(key="old", value="gone")
    contract.set_onnx_metadata(proto, {"half": "decoder", "latent_dim": "2"})
    assert contract.onnx_metadata(onnx.ModelProto.FromString(proto.SerializeToString())) == \
        {"half": "decoder", "latent_dim": "2"}


def test_sha256(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"kvae")
    import hashlib

    assert contract.sha256(path) == hashlib.sha256(b"kvae").hexdigest()


def test_manifest_entries_of_an_older_model_are_dropped(tmp_path, capsys):
    (tmp_path / "a.onnx").write_bytes(b"a")
    contract.update_manifest(tmp_path, {"source": {"x": "1"}}, {"a.onnx": {"n": 1}})
    merged = contract.update_manifest(tmp_path, {"source": {"x": "2"}}, {})
    assert merged["files"] == {} and "dropped manifest entries from an older model: a.onnx" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text()) == merged


def test_header_files_are_the_header_entries_that_name_a_file():
    manifest = {"source": {"encoder.keras": "ab"}, contract.PRIOR_ENTRY: {"file": contract.PRIOR, "sha256": "c"},
                contract.ORT_OPERATORS_ENTRY: {"file": contract.ORT_OPERATORS, "models": []},
                "classes": ["0", "1"], "odd": {"file": 3}, "files": {"file": {"file": "x.onnx"}}}
    assert contract.header_files(manifest) == {
        contract.PRIOR_ENTRY: manifest[contract.PRIOR_ENTRY],
        contract.ORT_OPERATORS_ENTRY: manifest[contract.ORT_OPERATORS_ENTRY]}
