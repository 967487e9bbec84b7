"""yarnkit: extend the context window of open LLMs with YaRN, train on 1..N GPUs, export, and serve.

Data flow: recipe → data → model patch → trainer → checkpoint → export → runtime → eval.
The public API is re-exported lazily here so `import yarnkit` stays light.
"""

__version__ = "0.1.0"

_API = {
    "apply_rope_scaling": "yarnkit.patch",
    "PatchHandle": "yarnkit.patch",
    "load_model": "yarnkit.models",
    "load_tokenizer": "yarnkit.models",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'yarnkit' has no attribute {name!r}")
