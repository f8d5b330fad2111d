"""The CLI as a user runs it: bad input gets one line naming the problem and exit code 2."""
import json
import shutil
import subprocess
import sys

import pytest


def vlmc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlmc.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_models_lists_builtin_and_families():
    r = vlmc("models", "--json")
    assert r.returncode == 0
    names = {row["name"] for row in json.loads(r.stdout)}
    assert {"shapes-llava", "llava"} <= names


def test_inspect_and_run(tiny_bundle, sample_image):
    r = vlmc("inspect", tiny_bundle.path)
    assert r.returncode == 0 and "text_decoder" in r.stdout and "verification" in r.stdout
    assert "KV cache: float32, " in r.stdout
    r = vlmc("run", tiny_bundle.path, "--runtime", "onnxruntime", "--image", sample_image, "--prompt", "what color is the circle ?", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runtime"] == "onnxruntime"


def test_profile_json(tiny_bundle):
    r = vlmc("profile", tiny_bundle.path, "--runtime", "onnxruntime", "--iterations", "2", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stages"]["prefill_ms"] > 0


@pytest.mark.parametrize("args,fragment", [
    (["export", "-o", "{tmp}/o", "--model", "{tmp}/missing"], "neither a built-in"),
    (["export", "-o", "{tmp}/o", "--target", "tflite"], "unknown target 'tflite'"),
    (["export", "-o", "{tmp}/o", "--target", "tflite", "--target", "onnx"], "unknown target 'tflite'"),  # repeated: all read
    (["export", "-o", "{tmp}/o", "--max-context", "4"], "recipe field 'max_context'"),
    (["export", "-o", "{tmp}/o", "--tile-grid", "2by2"], "--tile-grid '2by2': expected ROWSxCOLS"),
    (["export", "-o", "{tmp}/o", "--tile-grid", "2x2"], "llava family does not split images into tiles"),
    (["export", "-o", "{tmp}/o", "--coreml-precision", "int3"], "Invalid value for '--coreml-precision': 'int3' is not one of"),
    (["export", "-o", "{tmp}/o", "--bogus"], "No such option '--bogus'"),
    (["export", "-o", "{tmp}/o", "--recipe", "{tmp}/bad.yaml"], "recipe field 'bogus': unknown field"),
    (["export", "-o", "{tmp}/o", "--recipe", "{tmp}/range.yaml"], "recipe field 'coreml.precision'"),
    (["export", "-o", "{tmp}/o", "--model", "{tmp}/nocfg"], "no config.json"),
    (["export", "-o", "{tmp}/o", "--model", "{tmp}/noweights"], "no *.safetensors"),
    (["export", "-o", "{tmp}/o", "--model", "{tmp}/family"], "unknown model family 'gpt2'"),
])
def test_bad_export_input(tmp_path, tiny_ckpt, args, fragment):
    (tmp_path / "bad.yaml").write_text("targets: [onnx]\nbogus: 1\n")
    (tmp_path / "range.yaml").write_text("coreml: {precision: int3}\n")
    (tmp_path / "nocfg").mkdir()
    shutil.copytree(tiny_ckpt, tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    shutil.copytree(tiny_ckpt, tmp_path / "family")
    cfg = json.loads((tmp_path / "family" / "config.json").read_text())
    (tmp_path / "family" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    r = vlmc(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "o").exists()


def test_bad_run_and_profile_input(tiny_bundle, tmp_path, sample_image):
    (tmp_path / "notimage.png").write_text("hello")
    assert_one_line_error(vlmc("run", tiny_bundle.path, "--image", tmp_path / "notimage.png", "--prompt", "what"), "cannot read it as an image")
    assert_one_line_error(vlmc("run", tiny_bundle.path, "--image", tmp_path / "none.png", "--prompt", "what"), "no such file")
    assert_one_line_error(vlmc("run", tiny_bundle.path, "--runtime", "tflite", "--image", sample_image, "--prompt", "what"),
                          "Invalid value for '--runtime': 'tflite' is not one of 'eager', 'onnxruntime'")
    assert_one_line_error(vlmc("profile", tmp_path, "--runtime", "onnxruntime"), "no manifest.json")
    assert_one_line_error(vlmc("export", "-o", tiny_bundle.path, "--target", "onnx"), "exists (use --force")
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle.path, copy)
    with open(copy / "model.pte", "ab") as f:
        f.write(b"x")
    assert_one_line_error(vlmc("run", copy, "--runtime", "executorch", "--image", sample_image, "--prompt", "what"), "model.pte does not match its sha256")


def test_every_option_has_help_text():
    import click

    from vlmc.cli import cli

    def missing(cmd, path):
        found = [f"{path} {p.opts[0]}" for p in cmd.params if isinstance(p, click.Option) and not p.help]
        for name, sub in getattr(cmd, "commands", {}).items():
            found += missing(sub, f"{path} {name}")
        return found

    assert missing(cli, "vlmc") == []
