"""`showo eval`: the benchmarks Show-o reports, run with showo-mlx.

* `vqa`: POPE, MME and GQA in their published formats (lmms-lab parquet on the Hub, or local
  folders), answered by `Pipeline.ask` (greedy, KV-cached) with lmms-eval's prompt suffix, resumable
  answer logs, metrics as the benchmarks define them (`benchmarks.py`).
* `geneval`: images for GenEval's prompts in the folder layout its scorer reads (`geneval.py`);
  scoring itself stays with GenEval's tool.
* `during_training`: the `eval_every` / `eval_data` hook of `showo train`.

The package is optional: nothing outside it imports it at module level, so showo-mlx works without
it (and without its one extra dependency, pyarrow: `pip install "showo-mlx[eval]"`).
"""

from ..errors import ShowoError


class EvalError(ShowoError):
    """Bad benchmark data, answer log or evaluation option."""
