"""stablexl: Stable Diffusion XL, from scratch in PyTorch.

`stablexl.Pipeline` is imported on first use, so `import stablexl` (e.g. for `stablexl --help`) stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'stablexl' has no attribute {name!r}")
