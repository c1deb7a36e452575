"""How far a quantized or half-precision model's answers drift from float32: the measurement behind
docs/EVAL.md's "quantized models" section.

Run by hand (nothing is downloaded; the default is the repository's random-weight fixture model):

    python benchmarks/eval_quantized.py                         # fixture model
    python benchmarks/eval_quantized.py --model showlab/show-o  # real weights (downloads 5.8 GB once)

For POPE-style questions ("Is there a <object> in the image?" + lmms-eval's suffix) about a few
pictures, every variant answers through `Pipeline.ask` (greedy, the same MAGVIT codes for all) and
is compared with float32: the first answer token (the yes/no decision of a one-word answer), the
whole greedy answer (up to --tokens tokens), and the relative L2 error of the logits at the answer
position. Prints one table row per variant.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OBJECTS = ["cat", "dog", "car", "bird", "person", "chair", "bottle", "tree", "boat", "clock", "horse", "cup"]
SUFFIX = "\nAnswer the question using a single word or phrase."
VARIANTS = [("float16", dict(dtype="float16")), ("bfloat16", dict(dtype="bfloat16")),
            ("8-bit g64", dict(bits=8)), ("4-bit g64", dict(bits=4)), ("4-bit g64, 8-bit head", dict(bits=4, head_bits=8))]


def fixture_model(folder: Path) -> Path:
    from showo_mlx.convert import convert

    ref = ROOT / "tests" / "fixtures" / "reference"
    return convert(ref / "showo", folder / "fixture", vq=ref / "magvitv2", tokenizer=ref / "tokenizer", log=lambda m: None)


def answer_logits(pipe, codes, question):
    import mlx.core as mx

    from showo_mlx.attention import attention_mask

    prompt = pipe.prompting.mmu_gen(pipe.prompting.image_ids(codes), question)
    logits = pipe.model(mx.array(prompt.ids), mask=attention_mask(prompt.layouts))[0, -1].astype(mx.float32)
    return logits


def main() -> None:
    import mlx.core as mx
    import numpy as np

    from showo_mlx.convert import QuantizeSpec
    from showo_mlx.loading import resolve_model
    from showo_mlx.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the fixture model)")
    parser.add_argument("--images", nargs="*", default=None, help="pictures to ask about (default: the fixture's four)")
    parser.add_argument("--tokens", type=int, default=8, help="longest compared answer")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    folder = fixture_model(tmp) if args.model is None else resolve_model(args.model)
    images = args.images or [str(ROOT / "tests/fixtures/reference/images" / f"{n}.png")
                             for n in ("magvit_in_0", "magvit_in_1", "preprocess_in_0", "preprocess_in_1")]
    base = Pipeline(folder)
    codes = [base.encode_image(p) for p in images]
    questions = [f"Is there a {o} in the image?{SUFFIX}" for o in OBJECTS]
    cases = [(c, q) for c in codes for q in questions]

    def run(pipe):
        answers, logits = [], []
        for c, q in cases:
            answers.append(pipe.ask(None, q, codes=c, max_tokens=args.tokens))
            logits.append(np.array(answer_logits(pipe, c, q)))
        return answers, logits

    t = time.perf_counter()
    ref_answers, ref_logits = run(base)
    print(f"{folder}: {len(cases)} questions ({len(images)} pictures x {len(questions)}), float32 in {time.perf_counter() - t:.1f} s")
    print(f"{'variant':<24} {'1st token agrees':>17} {'answer agrees':>14} {'logit rel. L2 (mean / max)':>28}")
    for name, opts in VARIANTS:
        quant = QuantizeSpec(bits=opts["bits"], group_size=64, head_bits=opts.get("head_bits")) if "bits" in opts else None
        pipe = Pipeline(folder, dtype=opts.get("dtype"), quantize=quant, vq_dtype="float32")
        answers, logits = run(pipe)
        first = np.mean([a.argmax() == b.argmax() for a, b in zip(logits, ref_logits)])
        same = np.mean([a == b for a, b in zip(answers, ref_answers)])
        rel = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(logits, ref_logits)]
        print(f"{name:<24} {100 * first:>16.1f}% {100 * same:>13.1f}% {np.mean(rel):>16.4f} / {np.max(rel):.4f}")
        del pipe
        mx.clear_cache()


if __name__ == "__main__":
    main()
