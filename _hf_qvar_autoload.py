"""Registers hf_qvar with transformers whenever transformers is used, without `import hf_qvar`.

Installed with a one-line ``hf_qvar_autoload.pth`` in site-packages. It costs nothing at start-up: it
only adds a finder that waits for ``transformers.modeling_utils`` to finish importing and then imports
hf_qvar, so ``from_pretrained`` of a saved qvar model restores the quantized model instead of silently
loading a full-precision one. Set ``HF_QVAR_NO_AUTOLOAD=1`` to turn it off.
"""

import importlib.abc
import os
import sys
import warnings

_TARGET = "transformers.modeling_utils"


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                _wrap(spec.loader)
                return spec
        return None


def _wrap(loader):
    original = loader.exec_module

    def exec_module(module):
        original(module)
        try:
            import hf_qvar  # noqa: F401  (registers quant_method="qvar")
        except Exception as error:  # never break transformers itself
            warnings.warn(f"hf_qvar could not register with transformers: {error!r}", stacklevel=2)

    loader.exec_module = exec_module


def install() -> None:
    if os.environ.get("HF_QVAR_NO_AUTOLOAD") == "1" or _TARGET in sys.modules:
        return
    if not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


install()
