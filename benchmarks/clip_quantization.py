"""The CLIP path's logit error after quantization, measured on the CLIP fixture (no download).

    python benchmarks/clip_quantization.py

Converts tests/fixtures/reference-clip/ several ways (transformer float32 or quantized; the CLIP tower
float32, float16 or quantized with --q-vision) and prints, for each, the error of the prompt logits
(run 0, every position) against the official float32 outputs stored in the fixture, and how many of
the 3 × 20 greedy answer tokens are unchanged. The fixture's widths are tiny (tower 32, Phi 128), so
only group size 32 quantizes the tower's Linear layers; random weights quantize worse than trained ones.
"""

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from showo_mlx.attention import attention_mask  # noqa: E402
from showo_mlx.convert import QuantizeSpec, convert  # noqa: E402
from showo_mlx.decoding import SamplingOptions  # noqa: E402
from showo_mlx.pipeline import Pipeline  # noqa: E402

REF = ROOT / "tests" / "fixtures" / "reference-clip"
VARIANTS = [  # (label, convert options)
    ("float32 (reference run)", {}),
    ("transformer float32, tower float16", {"vision_dtype": "float16"}),
    ("transformer 8-bit g32, tower float32", {"quantize": QuantizeSpec(8, 32), "vision_dtype": "float32"}),
    ("transformer 8-bit g32, tower 8-bit g32", {"quantize": QuantizeSpec(8, 32), "quantize_vision": True}),
    ("transformer 4-bit g32, tower float32", {"quantize": QuantizeSpec(4, 32), "vision_dtype": "float32"}),
    ("transformer 4-bit g32, tower float16", {"quantize": QuantizeSpec(4, 32)}),
    ("transformer 4-bit g32, tower 4-bit g32", {"quantize": QuantizeSpec(4, 32), "quantize_vision": True}),
]


def measure(folder: Path, cases: dict, ref: dict) -> tuple[float, float, int]:
    pipe = Pipeline(folder)
    run = cases["mmu_generate"][0]
    prompt, emb = pipe.vit_prompt(REF / run["image"], run["question"])
    logits = np.array(pipe.model(None, input_embeddings=emb, mask=attention_mask([prompt.layout])).astype(mx.float32))
    want = ref["r0.prompt_logits"]
    err = float(np.abs(logits - want).max())
    rel = float(np.linalg.norm(logits - want) / np.linalg.norm(want))
    same = 0
    for r in cases["mmu_generate"]:
        p, e = pipe.vit_prompt(REF / r["image"], r["question"])
        tokens = list(pipe.answer_tokens(None, [p.layout], 20, SamplingOptions(), prompt_embeddings=e))
        same += sum(a == b for a, b in zip(tokens, r["generated"]))
    return err, rel, same


def main() -> None:
    cases = json.loads((REF / "cases.json").read_text())
    with np.load(REF / "mmu_vit.npz") as z:
        ref = {k: z[k] for k in z.files}
    tmp = Path(tempfile.mkdtemp())
    print(f"{'variant':42} {'max abs err':>12} {'rel L2':>9} {'greedy tokens kept':>19}")
    for i, (label, options) in enumerate(VARIANTS):
        folder = convert(REF / "showo", tmp / f"v{i}", vision_tower=REF / "clip", tokenizer=REF / "tokenizer",
                         no_vq=True, log=lambda m: None, **options)
        err, rel, same = measure(folder, cases, ref)
        print(f"{label:42} {err:12.2e} {rel:9.4f} {same:>14}/60")


if __name__ == "__main__":
    main()
