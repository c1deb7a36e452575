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


def enable_openblas() -> bool:
    """Linux: re-execute this Python process once with OpenBLAS preloaded, so MLX's CPU backend
    computes float32 matmuls ~100x faster than with the reference BLAS its wheel bundles. Call it
    first thing in a script (the script restarts from the top). True if OpenBLAS is in use; False
    (with a one-line hint) off Linux, without the library, or in an interactive session."""
    from .launcher import enable_openblas as _enable

    return _enable()


def __getattr__(name):
    # Pipeline is imported lazily so that `import showo_mlx` stays cheap (no MLX/transformers import).
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
