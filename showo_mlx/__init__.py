"""showo-mlx: Show-o, the unified multimodal transformer, on Apple silicon with MLX."""

__version__ = "0.1.0"
