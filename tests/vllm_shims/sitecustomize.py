"""Test-only shims that let vLLM's Qwen-VL code run where no CPU torchvision can be installed.

Put this directory on ``PYTHONPATH`` and every interpreter loads it at start-up:
the test session, the ``mmoffload serve`` subprocess, the engine core vLLM
spawns and the fresh interpreter vLLM inspects model classes in. A real
deployment has torchvision and needs none of this; the library never imports it.

Two things break without torchvision (``/work/shared/notes/vllm-on-cpu.md``):

- transformers' Qwen2-VL image-processing module imports
  ``torchvision.transforms.v2.functional`` at top level, and vLLM's Qwen model
  module imports it. Real ``import torchvision...`` statements get empty
  modules here, while ``importlib.util.find_spec("torchvision")`` still answers
  None, so transformers keeps its PIL image backend (which is what runs).
- The Qwen-VL processor classes refuse to load without a video processor
  (which needs torchvision). Once their modules are imported, ``video_processor``
  is dropped from their attributes and a placeholder carrying the few settings
  vLLM reads takes its place; videos are never sent in these tests.

One more, not about torchvision: with ``MMOFFLOAD_TEST_NORMALIZE_TWICE_DIR`` set,
the server makes the images under that directory with normalized pixels although
the engine normalizes on the device: the mismatch the engine side exists to
prevent, so a test can show what it would do to the logprobs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

STUBBED = "torchvision"
NORMALIZE_TWICE_ENV = "MMOFFLOAD_TEST_NORMALIZE_TWICE_DIR"


class _Anything:
    """Stands in for any torchvision name used at import time (enum members, functions)."""

    def __getattr__(self, name: str) -> _Anything:
        return _stub_attribute(name)

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()


def _stub_attribute(name: str) -> _Anything:
    if name.startswith("__"):
        raise AttributeError(name)  # introspection (inspect, pickle) must see a plain module
    return _Anything()


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []  # every stub is a package, so any submodule import works
        module.__getattr__ = _stub_attribute  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[types.ModuleType], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        self.patch(module)


class _VideoProcessorPlaceholder:
    """The settings vLLM reads from a Qwen-VL video processor, copied from the image processor."""

    valid_kwargs = type("VideoKwargs", (), {"__annotations__": {}})
    fps = 2.0
    do_sample_frames = False

    def __init__(self, image_processor: Any) -> None:
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.patch_size = image_processor.patch_size
        self.size = image_processor.size


def _drop_video_processor(cls: type) -> None:
    original_init = cls.__init__
    attributes = [name for name in cls.get_attributes() if name != "video_processor"]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.video_processor = _VideoProcessorPlaceholder(self.image_processor)

    cls.get_attributes = classmethod(lambda _cls: list(attributes))  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def _normalize_twice(module: types.ModuleType) -> None:
    directory = Path(os.environ[NORMALIZE_TWICE_ENV])
    original = module.RawRefEngineInputs._materialize

    def _materialize(self: Any, ref: Any) -> Any:
        if not Path(ref.uri.removeprefix("file://")).is_relative_to(directory):
            return original(self, ref)
        return module.materialize_ref(
            ref, lambda family, image: family.engine_pixels([image], device_normalizes=False)
        )

    def _materialize_bytes(self: Any, ref: Any, data: bytes) -> Any:
        if not Path(ref.uri.removeprefix("file://")).is_relative_to(directory):
            return original_bytes(self, ref, data)
        return module.materialize_bytes(
            ref, data, lambda family, image: family.engine_pixels([image], device_normalizes=False)
        )

    original_bytes = module.RawRefEngineInputs._materialize_bytes
    module.RawRefEngineInputs._materialize = _materialize
    # The content_parts path makes its images from bytes already read and verified.
    module.RawRefEngineInputs._materialize_bytes = _materialize_bytes


PATCHES: dict[str, Callable[[types.ModuleType], None]] = {
    "transformers.models.qwen2_vl.processing_qwen2_vl": lambda m: _drop_video_processor(m.Qwen2VLProcessor),
    "transformers.models.qwen2_5_vl.processing_qwen2_5_vl": lambda m: _drop_video_processor(
        m.Qwen2_5_VLProcessor
    ),
    "transformers.models.qwen3_vl.processing_qwen3_vl": lambda m: _drop_video_processor(m.Qwen3VLProcessor),
}
if os.environ.get(NORMALIZE_TWICE_ENV):
    PATCHES["mmoffload.inference.engine"] = _normalize_twice


class _ShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name == STUBBED or name.startswith(STUBBED + "."):
            # `importlib.util.find_spec` (transformers' availability probe) must still see nothing.
            caller = sys._getframe(2).f_code
            if (
                caller.co_name == "find_spec"
                and "importlib" in caller.co_filename
                and "util" in caller.co_filename
            ):
                return None
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        if name in PATCHES:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, PATCHES[name])
                    return spec
        return None


sys.meta_path.insert(0, _ShimFinder())
