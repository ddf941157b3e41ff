"""The ORT-format export (`python export/to_onnx.py RUN --ort`): onnxruntime's own format for its
reduced mobile builds, converted from the checked .onnx files.

The conv test run is exported to ONNX without `--ort` (the default), and a copy of that export
gets the ORT step (`kvae.export_onnx.export_ort`, what `--ort` runs after the .onnx files): the
.onnx files and their manifest entries must stay byte for byte what they were, and each .ort file
must compute what its .onnx file computes, measure against Keras what its .onnx file measured,
open in kvae.runtime, and have every operator it runs listed in the reduced-build config written
next to it. The script's flag itself runs once on a float32-only export. A later ONNX export
without `--ort` removes the .ort files and their config (a copy of the converted folder).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvae import contract
from kvae.export_checks import TOLERANCE
from kvae.export_onnx import ORT_LEVEL

REPO = Path(__file__).resolve().parent.parent
ORT_NAMES = [contract.filename(h, p, contract.ORT_FORMAT) for h in contract.HALVES for p in contract.PRECISIONS]
ONNX_NAMES = [contract.filename(h, p, "onnx") for h in contract.HALVES for p in contract.PRECISIONS]
ORT_VS_ONNX = 1e-4  # an .ort file's parity numbers against its .onnx file's (the same inputs) ...
ROUNDING = 0.011  # ... give or take the manifest's rounding of each to 3 significant digits


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """(plain, with_ort, run): the conv run's ONNX export (the default: no .ort files), and a copy
    of it that the ORT step then converted, each in a folder of its own."""
    from kvae.export import load_run
    from kvae.export_onnx import export_onnx, export_ort

    run = load_run(trained_run("conv"))
    plain = tmp_path_factory.mktemp("onnx-plain") / "export"
    export_onnx(run, plain)
    with_ort = tmp_path_factory.mktemp("onnx-ort") / "export"
    shutil.copytree(plain, with_ort)
    export_ort(run, with_ort)
    return plain, with_ort, run.path


def test_ort_is_off_by_default_and_leaves_the_onnx_files_as_they_were(exports):
    plain, with_ort, _ = exports
    assert not list(plain.glob("*.ort")) and not (plain / contract.ORT_OPERATORS).exists()
    plain_manifest, ort_manifest = contract.read_manifest(plain), contract.read_manifest(with_ort)
    assert "ort_operators" not in plain_manifest
    assert sorted(plain_manifest["files"]) == sorted(ONNX_NAMES)
    for name in ONNX_NAMES:
        assert (plain / name).read_bytes() == (with_ort / name).read_bytes(), name
        assert plain_manifest["files"][name] == ort_manifest["files"][name], name
    assert set(ort_manifest["files"]) == set(ONNX_NAMES) | set(ORT_NAMES)
    assert {k: v for k, v in ort_manifest.items() if k not in ("files", "ort_operators")} == {
        k: v for k, v in plain_manifest.items() if k != "files"}


def test_the_ort_flag_of_the_script(trained_run, tmp_path):
    """`python export/to_onnx.py RUN --ort`: the .onnx files, then their .ort files and the config."""
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), str(trained_run("conv")),
                           "--out", str(out), "--quantize", "none", "--ort"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("encoder.ort", "decoder.ort", contract.ORT_OPERATORS):
        assert f"wrote {name} " in done.stdout, done.stdout
    manifest = contract.read_manifest(out)
    assert sorted(manifest["files"]) == ["decoder.onnx", "decoder.ort", "encoder.onnx", "encoder.ort"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == contract.sha256(out / name), name  # .onnx files not rewritten
    assert manifest["ort_operators"]["models"] == ["decoder.ort", "encoder.ort"]


def test_manifest_records_each_ort_file(exports):
    _, folder, _ = exports
    manifest = contract.read_manifest(folder)
    for name in ORT_NAMES:
        entry = manifest["files"][name]
        source = manifest["files"][name.replace(".ort", ".onnx")]
        assert entry["format"] == "ort" and entry["half"] == source["half"]
        assert entry["precision"] == source["precision"]
        assert entry["sha256"] == contract.sha256(folder / name)
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["inputs"] == source["inputs"] and entry["outputs"] == source["outputs"]
        assert entry["batch"] == "dynamic" and entry["opset"] == 17
        assert entry["ort"]["source"] == name.replace(".ort", ".onnx")
        assert entry["ort"]["source_sha256"] == source["sha256"]
        assert entry["ort"]["optimization_level"] == ORT_LEVEL[entry["precision"]]
        assert entry["ort"]["optimization_style"] == "Fixed"
        # the numbers the self-check measured on the .ort file itself: float32 within the float32
        # bound, and every precision what its .onnx file measured on the same inputs (the two
        # compute the same to ~1e-5, test_each_ort_file_computes_what_its_onnx_file_computes)
        for output, diff in entry["parity"]["max_abs_diff"].items():
            if entry["precision"] == "fp32":
                assert diff <= TOLERANCE["fp32"][output], (name, output, diff)
            for stat in ("max_abs_diff", "mean_abs_diff"):
                ours, theirs = entry["parity"][stat][output], source["parity"][stat][output]
                assert abs(ours - theirs) <= ORT_VS_ONNX + ROUNDING * max(ours, theirs), (
                    name, stat, output, ours, theirs)
        assert ("nll_delta" in entry) == (entry["precision"] != "fp32")
        if entry["precision"] == "int8":
            assert entry["quantization"] == source["quantization"]
            assert entry["int8_types"] == source["int8_types"]
        if "nll_delta" in entry:  # measured on the .ort file: the .onnx file's change, give or take rounding
            assert abs(entry["nll_delta"] - source["nll_delta"]) <= 0.01, name


def test_an_onnx_export_removes_the_ort_files_it_replaces_the_sources_of(exports, tmp_path, capsys):
    """`to_onnx.py RUN --ort`, a retrain, then `to_onnx.py RUN`: the .ort files (and their
    config) were converted from .onnx files that export replaces; left on disk, the runtime would
    still open them by name. Without --ort the export removes them, with their manifest entries."""
    from kvae.export import load_run
    from kvae.export_onnx import export_onnx
    from kvae.runtime import VAE, RuntimeInputError
    from kvae.sessions import resolve

    _, folder, run = exports
    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    manifest = contract.read_manifest(copy)
    assert set(ORT_NAMES) <= set(manifest["files"]) and (copy / contract.ORT_OPERATORS).is_file()
    # the manifest of an earlier training of the run (another source), as a retrain leaves it
    older = {**manifest, "source": {name: "0" * 64 for name in manifest["source"]}}
    (copy / contract.MANIFEST).write_text(json.dumps(older))
    capsys.readouterr()
    export_onnx(load_run(run), copy, quantize=())
    out = capsys.readouterr().out
    assert not list(copy.glob("*.ort")) and not (copy / contract.ORT_OPERATORS).exists()
    assert f"removed {', '.join([*ORT_NAMES, contract.ORT_OPERATORS])} (" in out and "--ort" in out, out
    fresh = contract.read_manifest(copy)
    assert sorted(fresh["files"]) == ["decoder.onnx", "encoder.onnx"] and "ort_operators" not in fresh
    assert fresh["source"] == manifest["source"]
    with pytest.raises(RuntimeInputError, match="decoder.ort"):
        resolve(copy, "decoder", "ort")
    with pytest.raises(RuntimeInputError, match="encoder.ort"):
        VAE.from_folder(copy, format="ort")
    # a folder with no .ort files: nothing to remove, nothing said
    export_onnx(load_run(run), copy, quantize=())
    assert "removed" not in capsys.readouterr().out


def onnxruntime_outputs(path: Path, feeds: dict) -> dict:
    """The file run by onnxruntime directly (none of kvae's session code)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def test_each_ort_file_computes_what_its_onnx_file_computes(exports):
    """fp32 and int8 at level "all" are the graph onnxruntime makes of the .onnx file when it
    loads it; fp16 at level "disable" keeps the Casts unfolded (float32 arithmetic either way)."""
    _, folder, _ = exports
    manifest = contract.read_manifest(folder)
    rng = np.random.default_rng(0)
    feeds = {"decoder": {"z": rng.standard_normal((16, manifest["latent_dim"]), dtype=np.float32)},
             "encoder": {"x": (rng.random((16, *manifest["image_shape"])) > 0.7).astype(np.float32)}}
    for name in ORT_NAMES:
        entry = manifest["files"][name]
        ours = onnxruntime_outputs(folder / name, feeds[entry["half"]])
        theirs = onnxruntime_outputs(folder / entry["ort"]["source"], feeds[entry["half"]])
        for output in contract.OUTPUTS[entry["half"]]:
            assert np.abs(ours[output] - theirs[output]).max() <= 1e-5, (name, output)


def test_float32_ort_files_match_keras(exports):
    import keras

    _, folder, run = exports
    rng = np.random.default_rng(1)
    z = rng.standard_normal((8, 8), dtype=np.float32)
    x = (rng.random((8, 28, 28, 1)) > 0.7).astype(np.float32)
    decoder = keras.saving.load_model(run / "decoder.keras", safe_mode=True)
    encoder = keras.saving.load_model(run / "encoder.keras", safe_mode=True)
    x_mean = onnxruntime_outputs(folder / "decoder.ort", {"z": z})["x_mean"]
    assert np.abs(x_mean - np.asarray(decoder(z))).max() <= TOLERANCE["fp32"]["x_mean"]
    out = onnxruntime_outputs(folder / "encoder.ort", {"x": x})
    loc, scale = (np.asarray(t) for t in encoder(x))
    assert np.abs(out["loc"] - loc).max() <= TOLERANCE["fp32"]["loc"]
    assert np.abs(out["scale"] - scale).max() <= TOLERANCE["fp32"]["scale"]


def test_fp16_ort_files_keep_their_float16_weights(exports):
    """Any optimization level but "disable" folds the float16 -> float32 Casts into float32 weights."""
    _, folder, _ = exports
    for half in contract.HALVES:
        fp16, fp32 = (folder / contract.filename(half, p, "ort") for p in ("fp16", "fp32"))
        assert fp16.stat().st_size < 0.6 * fp32.stat().st_size, half


def test_runtime_opens_ort_files(exports):
    from kvae.runtime import VAE, Decoder, Encoder

    _, folder, _ = exports
    for precision in contract.PRECISIONS:
        decoder = Decoder(folder / contract.filename("decoder", precision, "ort"), verify=True)
        assert decoder.format == "ort" and decoder.latent_dim == 8
        assert decoder.info["precision"] == precision and decoder.info["source"] == "manifest.json"
        onnx = Decoder(folder / contract.filename("decoder", precision, "onnx"))
        assert np.abs(decoder.sample(5, seed=3) - onnx.sample(5, seed=3)).max() <= 1e-5
    picked = VAE.from_folder(folder, format="ort", precision="int8")
    assert (picked.encoder.path.name, picked.decoder.path.name) == ("encoder.ort", "decoder.int8.ort")
    vae = VAE(folder / "encoder.ort", folder / "decoder.ort")
    images = vae.sample(4, seed=0)
    loc, scale = vae.encode(images)
    want = Encoder(folder / "encoder.onnx").encode(images)
    assert np.abs(loc - want[0]).max() <= 1e-5 and np.abs(scale - want[1]).max() <= 1e-5
    assert np.isfinite(vae.log_likelihood((images > 0.5).astype(np.float32), k=5)).all()


def test_kvae_sample_takes_the_ort_files_of_a_folder(exports, tmp_path):
    _, folder, _ = exports
    done = subprocess.run([sys.executable, "-m", "kvae.sample", str(folder), "--format", "ort",
                           "--precision", "fp16", "--n", "3", "--seed", "0", "--out", str(tmp_path / "x.npy")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "decoder.fp16.ort" in done.stdout, done.stderr
    assert np.load(tmp_path / "x.npy").shape == (3, 28, 28, 1)


def test_a_broken_ort_file_is_one_line(exports, tmp_path):
    from kvae.runtime import Decoder, RuntimeInputError

    _, folder, _ = exports
    broken = tmp_path / "decoder.ort"
    broken.write_bytes((folder / "decoder.ort").read_bytes()[:5000])
    with pytest.raises(RuntimeInputError, match="as an ORT-format model") as e:
        Decoder(broken)
    assert "\n" not in str(e.value)


def optimized_op_types(path: Path, level: str) -> set[str]:
    """The op types onnxruntime runs for an .onnx file at the converter's level (less NCHWc)."""
    import onnx
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    options.add_session_config_entry("session.qdqisint8allowed", "0")  # as the converter on x86
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["NchwcTransformer"])
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def config_ops(ops: str) -> list[str]:
    """The operator names of a config line's list: `Cast{"inputs": {...}},ConvTranspose,...`."""
    names, depth, current = [], 0, ""
    for char in ops + ",":
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current.split("{")[0])
            current = ""
        else:
            current += char
    return names


def test_the_operator_config_lists_every_operator_the_ort_files_run(exports, tmp_path):
    """required_operators_and_types.config is what a reduced onnxruntime build is made from
    (`--include_ops_by_config`): an operator missing from it would be missing from the build."""
    _, folder, _ = exports
    manifest = contract.read_manifest(folder)
    config = folder / contract.ORT_OPERATORS
    entry = manifest["ort_operators"]
    assert entry["file"] == contract.ORT_OPERATORS and entry["sha256"] == contract.sha256(config)
    assert entry["models"] == sorted(ORT_NAMES) and entry["type_reduction"] is True
    text = config.read_text()
    assert str(folder) not in text and "/tmp" not in text  # the same bytes on every machine
    listed = {op for line in text.splitlines() if line and not line.startswith("#")
              for op in config_ops(line.split(";", 2)[2])}
    needed = set()
    for name in ORT_NAMES:
        source = tmp_path / manifest["files"][name]["ort"]["source"]
        shutil.copy(folder / source.name, source)
        needed |= optimized_op_types(source, ORT_LEVEL[manifest["files"][name]["precision"]])
    assert {"ConvTranspose", "Sigmoid", "Softplus"} <= needed
    missing = needed - listed
    assert not missing, f"{missing} run in the .ort files but are not in {contract.ORT_OPERATORS}"


def test_another_exporters_merge_keeps_the_operator_config(exports, tmp_path):
    """export/to_tflite.py merges its own header into the manifest: the "ort_operators" entry of
    the ONNX export survives it while its file exists, and goes with the file or another model."""
    _, folder, _ = exports
    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    manifest = contract.read_manifest(copy)
    header = {k: v for k, v in manifest.items() if k not in ("files", "ort_operators")}
    merged = contract.update_manifest(copy, header, {})
    assert merged["ort_operators"] == manifest["ort_operators"]
    assert set(merged["files"]) == set(manifest["files"])
    (copy / contract.ORT_OPERATORS).unlink()
    assert "ort_operators" not in contract.update_manifest(copy, header, {})
    shutil.copy(folder / contract.ORT_OPERATORS, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = {**header, "source": {"encoder.keras": "0" * 64, "decoder.keras": "0" * 64}}
    assert "ort_operators" not in contract.update_manifest(copy, other, {})
