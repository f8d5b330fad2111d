"""The bad-input catalogue: each case is exit status 2 and one `error:` line naming what is wrong, and
nothing is read from outside the bundle or left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmc.bundle import sha256_of, size_of


def vlmc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmc.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_clean_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def onnx_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle's ONNX target, safe to tamper with."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    return copy


def edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def list_file(manifest: dict, name: str, real: Path) -> None:
    """List `name` with the hash of `real`: what an attacker who edits the manifest would write."""
    manifest["files"][name] = {"sha256": sha256_of(real), "bytes": size_of(real)}


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "..", "sub/../../x", ""])
def test_a_manifest_naming_a_file_outside_the_bundle_is_refused(onnx_copy, name):
    edit_manifest(onnx_copy, lambda m: list_file(m, name, Path("/etc/hostname")))
    assert_clean_error(vlmc("inspect", onnx_copy), "which is not a file inside the bundle")


def test_a_program_loaded_from_outside_the_bundle_is_refused(onnx_copy, tmp_path, sample_image):
    """A program's file re-pointed at an absolute path holding a valid model with its hash: never loaded."""
    outside = tmp_path / "elsewhere" / "vision_encoder.onnx"
    outside.parent.mkdir()
    shutil.copy(onnx_copy / "vision_encoder.onnx", outside)

    def repoint(m):
        m["targets"]["onnx"]["programs"]["vision_encoder"]["file"] = str(outside)
        list_file(m, str(outside), outside)

    edit_manifest(onnx_copy, repoint)
    r = vlmc("run", onnx_copy, "--runtime", "onnxruntime", "--image", sample_image, "-p", "what color is the circle ?")
    assert_clean_error(r, str(outside), "not a file inside the bundle")


def test_a_symlink_leading_out_of_the_bundle_is_refused(onnx_copy, tmp_path):
    outside = tmp_path / "tokenizer.json"
    shutil.move(onnx_copy / "tokenizer.json", outside)
    os.symlink(outside, onnx_copy / "tokenizer.json")  # same bytes, same hash: only the link gives it away
    assert_clean_error(vlmc("inspect", onnx_copy), "tokenizer.json is a symlink")


def test_a_symlink_inside_a_package_folder_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy, symlinks=True)
    package = next(p for p in copy.iterdir() if p.suffix == ".mlpackage")
    weights = next(p for p in package.rglob("*") if p.is_file())
    os.symlink("/etc/hostname", weights.parent / "extra")
    edit_manifest(copy, lambda m: list_file(m, package.name, package))
    assert_clean_error(vlmc("inspect", copy), "is a symlink")


def test_a_manifest_of_the_wrong_shape_is_a_clean_error(onnx_copy):
    for manifest in ([1, 2], {"format": "vlmc-bundle/1", "files": ["a"]}, {"format": "vlmc-bundle/1", "files": {"a": 3}}):
        (onnx_copy / "manifest.json").write_text(json.dumps(manifest))
        assert_clean_error(vlmc("inspect", onnx_copy), str(onnx_copy))


def test_profile_ops_writes_nothing_into_the_bundle(onnx_copy):
    before = sorted(p.relative_to(onnx_copy) for p in onnx_copy.rglob("*"))
    r = vlmc("profile", onnx_copy, "--runtime", "onnxruntime", "--ops", "-n", "1", "--warmup", "0", "--new-tokens", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert any(row["program"] == "vision_encoder" for row in json.loads(r.stdout)["ops"])
    assert sorted(p.relative_to(onnx_copy) for p in onnx_copy.rglob("*")) == before


def test_a_config_implying_terabytes_is_refused_before_allocating(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["vocab_size"] = 100_000_000_000  # 25.6 TB of float32 embeddings if allocated
    (ckpt / "config.json").write_text(json.dumps(config))
    r = vlmc("export", "--model", ckpt, "--target", "onnx", "-o", tmp_path / "out")
    assert_clean_error(r, "config implies (100000000000, 64)")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("recipe, flags, fragment", [
    ("coreml: 5\n", ["--coreml-precision", "fp16"], "recipe field 'coreml': expected a mapping, got 5"),
    ("passes: [{name: [1]}]\n", [], "recipe field 'passes': pass 0: 'name' must be a pass's name"),
    ("passes: [{name: divprune, keep: '@'}]\n", [], "pass divprune: parameter 'keep'"),
])
def test_recipe_fields_of_the_wrong_kind(tmp_path, recipe, flags, fragment):
    (tmp_path / "recipe.yaml").write_text(recipe)
    r = vlmc("export", "--recipe", tmp_path / "recipe.yaml", *flags, "--target", "onnx", "-o", tmp_path / "out")
    assert_clean_error(r, fragment)
    assert not (tmp_path / "out").exists()


def test_a_pass_value_that_is_not_yaml_is_taken_as_text(tmp_path):
    r = vlmc("export", "--pass", "divprune:keep=@", "--target", "onnx", "-o", tmp_path / "out")
    assert_clean_error(r, "pass divprune: parameter 'keep'")


def test_a_killed_export_leaves_nothing_once_the_next_one_starts(tmp_path):
    """SIGKILL at several points of an export: the partial folder it leaves is swept by the next export."""
    import signal
    import time

    from vlmc.bundle import BundleWriter

    out = tmp_path / "m"
    for delay in (0.0, 1.5, 4.0):
        proc = subprocess.Popen([sys.executable, "-m", "vlmc.cli", "export", "--target", "onnx", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".m.*.partial")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert list(tmp_path.glob(".m.*.partial")), f"no partial bundle to sweep (killed after {delay} s)"
        with BundleWriter(out):
            assert [p.name for p in tmp_path.glob(".m.*.partial")] != [] and all(
                (p / ".vlmc-owner").read_text().split()[0] == str(os.getpid()) for p in tmp_path.glob(".m.*.partial"))
        assert not list(tmp_path.glob(".m.*")) and not out.exists()


def test_exports_racing_to_force_one_output_both_finish(tmp_path):
    import threading

    from vlmc.bundle import Bundle, BundleWriter

    out = tmp_path / "m"
    errors = []

    def export(tag: str):
        try:
            for _ in range(20):
                with BundleWriter(out, force=True) as w:
                    w.path("weights.bin").write_text(tag)
                    w.commit({"format": "vlmc-bundle/1", "name": tag, "model": {}, "prompt": {}, "decoder": {},
                              "recipe": {}, "passes": [], "targets": {}})
        except Exception as e:  # noqa: BLE001 (any failure is the test's finding)
            errors.append(e)

    threads = [threading.Thread(target=export, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    b = Bundle(out)
    assert b.file("weights.bin").read_text() == b.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_output_whose_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_clean_error(vlmc("export", "--target", "onnx", "-o", tmp_path / "file" / "m"), "cannot create it")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (PIL refuses it on open, before decoding anything)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def test_images_too_large_to_decode_and_16_bit_greyscale(tmp_path):
    import numpy as np
    from PIL import Image

    from vlmc.errors import VlmcError
    from vlmc.runtimes.image import load_image

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(VlmcError, match="too large to decode safely"):
        load_image(bomb, 32)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = load_image(tmp_path / "grey16.png", 32, {"rule": "square", "filter": "nearest"})
    assert pixels.min() <= 5 and pixels.max() >= 250 and 100 < pixels.mean() < 155  # a ramp, not a white square


def test_eval_refuses_a_non_utf8_dataset_and_no_questions(tmp_path):
    bad = tmp_path / "questions.jsonl"
    bad.write_bytes(b'{"image": "a.png", "question": "caf\xe9", "answer": "x"}\n')
    assert_clean_error(vlmc("eval", "shapes-llava", "--runtime", "eager", "--dataset", bad), "not UTF-8 text")
    for n in ("0", "-1"):
        assert_clean_error(vlmc("eval", "shapes-llava", "--runtime", "eager", "--dataset", bad, "--n", n), "--n must be at least 1")


def test_sweep_keeps_earlier_results_without_force(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    r = vlmc("sweep", "--tokens", "divprune@22", "--n", "8", "-o", tmp_path)
    assert_clean_error(r, f"output {tmp_path} holds a sweep's results (use --force to replace them)")
    assert (tmp_path / "sweep.json").read_text() == "{}"


def test_the_python_api_works_from_an_unguarded_script(tiny_bundle, tmp_path):
    """profile's measuring process is a fresh interpreter that never re-runs the caller's script."""
    script = tmp_path / "snippet.py"
    script.write_text("import vlmc.api as vlmc\n"
                      "print('ran')\n"
                      f"print(vlmc.profile({str(tiny_bundle.path)!r}, 'onnxruntime', warmup=0, iterations=1, new_tokens=1)['stages']['prefill_ms'] > 0)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ran", "True"]  # the script ran once


def test_a_swapped_onnx_file_names_the_program_and_input(onnx_copy, sample_image):
    """A valid ONNX file of another program put in vision_encoder's place, its hash updated to match."""
    shutil.copy(onnx_copy / "token_embedding.onnx", onnx_copy / "vision_encoder.onnx")
    edit_manifest(onnx_copy, lambda m: list_file(m, "vision_encoder.onnx", onnx_copy / "vision_encoder.onnx"))
    r = vlmc("run", onnx_copy, "--runtime", "onnxruntime", "--image", sample_image, "-p", "what color is the circle ?")
    assert_clean_error(r, "vision_encoder: the ONNX graph has no input 'image' (it takes input_ids)")


def test_an_edited_manifest_input_is_named(onnx_copy):
    def edit(m):  # the token ids said to be float
        m["targets"]["onnx"]["programs"]["token_embedding"]["inputs"][0]["dtype"] = "float32"

    edit_manifest(onnx_copy, edit)
    r = vlmc("profile", onnx_copy, "--runtime", "onnxruntime", "-n", "1")
    assert_clean_error(r, "input 'input_ids' is int64 in the ONNX graph, float32 in the manifest")


def test_yaml_errors_name_the_line_and_column(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: shapes-llava\npasses: [\n")
    assert_clean_error(vlmc("export", "--recipe", recipe, "-o", tmp_path / "b"),
                       f"recipe {recipe}: invalid YAML at line 3, column 1 (expected the node content")
    devices = tmp_path / "devices.yaml"
    devices.write_text("devices:\n  pi: {url: ssh://me@pi\n")
    assert_clean_error(vlmc("devices", "--devices", devices), f"devices file {devices}: invalid YAML at line 3, column 1")


def test_dataset_json_lists_what_it_wrote(tmp_path):
    r = vlmc("dataset", "shapes-vqa", "--n", "2", "-o", tmp_path, "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["n"] == 2 and all(Path(p).is_file() for p in out["images"] + [out["questions"]])
