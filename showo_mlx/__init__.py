"""showo-mlx: Show-o, the unified multimodal transformer, on Apple silicon with MLX.

    import showo_mlx
    pipe = showo_mlx.load("showlab/show-o")
    pipe.generate("a rally car race", seed=0)
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a model (Hub id, official folder or converted folder) into a ready `Pipeline`."""
    from .pipeline import load as _load

    return _load(*args, **kwargs)


def __getattr__(name):
    # Pipeline is imported lazily so that `import showo_mlx` stays cheap (no MLX/transformers import).
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
