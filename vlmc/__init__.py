"""vlmc: compile vision-language models for phones and edge devices.

    import vlmc
    bundle = vlmc.compile({"model": "shapes-llava", "targets": ["onnx", "executorch"]}, "build/m")
    vlmc.profile("build/m", "onnxruntime")
"""
__version__ = "0.1.0"

from vlmc.api import compile, inspect, profile, run  # noqa: E402

__all__ = ["compile", "inspect", "profile", "run", "__version__"]
