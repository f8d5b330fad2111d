"""Property-based fuzzing of what users hand vlmc: recipes (YAML text, fields, command-line overrides), pass
specs, and bundle manifests. The only allowed outcomes are success or a VlmcError (a clean one-line error).

The default run tries VLMC_FUZZ_EXAMPLES inputs per property (100); the issue's 10,000-input run is
`VLMC_FUZZ_EXAMPLES=2500 python -m pytest tests/test_fuzz.py` (four properties).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from vlmc import api, recipe as recipes
from vlmc.bundle import FORMAT, Bundle, sha256_of, size_of
from vlmc.errors import VlmcError
from vlmc.passes import registry

FUZZ = settings(max_examples=int(os.environ.get("VLMC_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                      max_leaves=12)


def _field_names(model, prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        names.append(prefix + name)
        sub = getattr(field.annotation, "model_fields", None)
        if sub is not None:
            names += _field_names(field.annotation, f"{prefix}{name}.")
    return names


RECIPE_FIELDS = _field_names(recipes.Recipe)
PASS_NAMES = sorted(registry.REGISTRY)
PASS_PARAMS = sorted({k for cls in registry.REGISTRY.values() for k in cls.Config.model_fields})

pass_specs = st.fixed_dictionaries({"name": st.sampled_from(PASS_NAMES) | values},
                                   optional={k: values for k in PASS_PARAMS[:12]})
recipe_dicts = st.dictionaries(st.sampled_from([f for f in RECIPE_FIELDS if "." not in f]) | st.text(max_size=8),
                               values | st.lists(pass_specs, max_size=3), max_size=6)


def only_clean_errors(fn, *args):
    try:
        return fn(*args)
    except VlmcError as e:
        assert str(e).strip() and "\n" not in str(e).strip().split("\n")[0]
        return None


def _recipe_and_passes(data):
    r = recipes.build(data)
    for spec in r.passes:
        registry.build(spec)
    return r


@FUZZ
@given(recipe_dicts)
def test_recipe_fields(data):
    only_clean_errors(_recipe_and_passes, data)


@FUZZ
@given(st.one_of(st.text(max_size=200), recipe_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True))),
       st.dictionaries(st.sampled_from(RECIPE_FIELDS), values, max_size=3))
def test_recipe_files_with_command_line_overrides(text, overrides):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text)
        only_clean_errors(recipes.load, str(path), overrides)


@FUZZ
@given(st.one_of(st.text(max_size=60),
                 st.builds(lambda n, kv: n + ":" + ",".join(f"{k}={v}" for k, v in kv),
                           st.sampled_from(PASS_NAMES) | st.text(max_size=8),
                           st.lists(st.tuples(st.sampled_from(PASS_PARAMS) | st.text(max_size=6), st.text(max_size=10)), max_size=4))))
def test_pass_specs_from_the_command_line(text):
    only_clean_errors(lambda: registry.build(registry.parse_cli(text)))


def _bundle_with(manifest) -> Path:
    d = Path(tempfile.mkdtemp(prefix="vlmc-fuzz-"))
    (d / "weights.bin").write_bytes(b"\x01\x02\x03")
    (d / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return d


def _valid_manifest() -> dict:
    probe = Path(tempfile.mkdtemp(prefix="vlmc-fuzz-")) / "weights.bin"
    probe.write_bytes(b"\x01\x02\x03")
    return {"format": FORMAT, "name": "fuzz", "model": {}, "prompt": {}, "decoder": {}, "recipe": {}, "passes": [],
            "files": {"weights.bin": {"sha256": sha256_of(probe), "bytes": size_of(probe)}},
            "targets": {"onnx": {"programs": {"vision_encoder": {"file": "weights.bin", "files": ["weights.bin"]}}}}}


VALID = _valid_manifest()


@FUZZ
@given(st.one_of(
    st.text(max_size=100),
    values.map(json.dumps),
    st.tuples(st.sampled_from(sorted(VALID)), values).map(lambda kv: {**VALID, kv[0]: kv[1]}),
    st.dictionaries(st.text(max_size=30), st.fixed_dictionaries({"sha256": st.text(max_size=64), "bytes": st.integers()}), max_size=3)
      .map(lambda files: {**VALID, "files": files})))
def test_manifests(manifest):
    import shutil

    d = _bundle_with(manifest)
    try:
        def read():
            api.inspect(d)
            Bundle(d).programs("onnx")

        only_clean_errors(read)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_valid_manifest_reads():
    d = _bundle_with(VALID)
    assert api.inspect(d)["name"] == "fuzz"
