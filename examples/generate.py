"""Text to image: one PNG per seed.

    python examples/generate.py "a rally car race at sunset" --seed 0 -n 2
"""

import argparse
from pathlib import Path

import showo_mlx.pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="?", default="a rally car race at sunset")
parser.add_argument("--model", default="showlab/show-o", help="Hub id or local folder")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-n", type=int, default=2, help="images (seeds seed, seed+1, ...)")
parser.add_argument("--steps", type=int, help="MaskGIT steps (default: the model's)")
parser.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
parser.add_argument("--output-dir", default=".")
args = parser.parse_args()

pipe = showo_mlx.pipeline.load(args.model)
images = pipe.generate(args.prompt, seed=args.seed, n=args.n, steps=args.steps, guidance=args.guidance)
for result in images:
    path = Path(args.output_dir) / f"generate_{result.seed}.png"
    result.save(path)  # the PNG with its settings: prompt, seed, steps, model... (showo info PATH)
    print(f"saved {path} ({result.image.width}x{result.image.height})")
