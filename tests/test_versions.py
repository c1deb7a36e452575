"""The dependency floors in pyproject.toml are at least the versions that introduced the APIs the code
calls. Each row names where the code calls the API (checked, so the table cannot go stale) and the
first release that has it, found in the projects' histories:

- mlx: github.com/ml-explore/mlx, `git tag --contains` of the commit adding the binding;
- mlx-lm: github.com/ml-explore/mlx-lm, the first `_version.py` bump after the commit.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# (package, first version, what, file that calls it, a pattern of that call)
API_FLOORS = [
    ("mlx", "0.29.0", "mx.quantized_matmul(mode=) and QuantizedLinear.mode (ml-explore/mlx#2499)",
     "showo_mlx/model.py", r"quantized_matmul\((?s:.)*mode=head\.mode"),
    ("mlx", "0.26.5", "the mlx[cpu] extra for Linux (mlx#2356; mlx-cpu wheels start at 0.26.5)",
     "pyproject.toml", r"mlx\[cpu\]"),
    ("mlx", "0.24.1", "memory functions at the top level: mx.get_peak_memory, mx.reset_peak_memory, ... (mlx#1982)",
     "showo_mlx/memory.py", r"mx\.reset_peak_memory\(\)"),
    ("mlx", "0.24.1", "mx.get_active_memory / mx.set_memory_limit / mx.set_cache_limit / mx.clear_cache at the top level",
     "showo_mlx/memory.py", r"mx\.set_memory_limit\("),
    ("mlx", "0.24.0", 'mx.fast.scaled_dot_product_attention(mask="causal")',
     "showo_mlx/attention.py", r'return "causal"'),
    ("mlx", "0.22.0", "boolean masks in mx.fast.scaled_dot_product_attention",
     "showo_mlx/attention.py", r"mx\.fast\.scaled_dot_product_attention\(q, k, v, scale=scale, mask=mask\)"),
    ("mlx", "0.18.0", "nn.average_gradients", "showo_mlx/train/distributed.py", r"average_gradients"),
    ("mlx", "0.17.0", "mx.fast.metal_kernel", "showo_mlx/kernels/metal_attention.py", r"mx\.fast\.metal_kernel\("),
    ("mlx", "0.15.0", "mx.distributed.init(strict=)", "showo_mlx/train/distributed.py", r"init\(strict=False\)"),
    ("mlx-lm", "0.21.0", "make_sampler(top_k=) (mlx-examples#1166)", "showo_mlx/decoding.py", r"make_sampler\(.*top_k="),
    ("mlx-lm", "0.21.0", "mlx_lm.utils.dequantize_model", "showo_mlx/train/lora.py", r"from mlx_lm\.utils import dequantize_model"),
]  # fmt: skip

# Used only by the tests (not a floor of the package): mx.get_memory_limit (mlx 0.32.3) in
# tests/conftest.py and test_bench.py; exporting a custom Metal kernel without Metal (mlx 0.32.0,
# mlx#3650) in test_metal_kernel.py. The development machine runs mlx 0.32.4.


def _dependencies() -> list[Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in project["dependencies"]]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} has no lower bound"
    return max(floors)


@pytest.mark.parametrize("package, version, what, path, pattern", API_FLOORS, ids=[r[2][:40] for r in API_FLOORS])
def test_api_is_used_where_the_table_says(package, version, what, path, pattern):
    assert re.search(pattern, (ROOT / path).read_text()), f"{what}: no longer called in {path}; update the table"


def test_floors_cover_the_apis_used():
    deps = _dependencies()
    needed = {}
    for package, version, *_ in API_FLOORS:
        needed[package] = max(needed.get(package, Version("0")), Version(version))
    mlx_reqs = [r for r in deps if r.name == "mlx"]
    assert {str(r.marker) for r in mlx_reqs} == {
        'sys_platform == "darwin" and platform_machine == "arm64"',
        'sys_platform == "linux"',
    }
    for req in mlx_reqs:
        assert _floor(req) >= needed["mlx"], (str(req), needed["mlx"])
        on_linux = req.marker.evaluate({"sys_platform": "linux", "platform_machine": "x86_64"})
        assert ("cpu" in req.extras) == on_linux  # plain `mlx` cannot import on Linux
        assert not req.marker.evaluate({"sys_platform": "darwin", "platform_machine": "x86_64"})  # no Intel Macs
    (lm,) = [r for r in deps if r.name == "mlx-lm"]
    assert _floor(lm) >= needed["mlx-lm"]
