"""Extrapolation (outpainting): grow an image by half a window per direction.

    python examples/extend.py photo.png "a quiet lake" "a pine forest" -d left -d right
"""

import argparse

import showo_mlx.pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("image")
parser.add_argument("prompts", nargs="+", help="one prompt, or one per direction")
parser.add_argument("-d", "--direction", action="append", choices=["left", "right", "up", "down"])
parser.add_argument("--model", default="showlab/show-o", help="Hub id or local folder")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, help="MaskGIT steps per window (default 16)")
parser.add_argument("--output", default="extended.png")
args = parser.parse_args()

pipe = showo_mlx.pipeline.load(args.model)
directions = args.direction or ["left", "right"]
(result,) = pipe.extrapolate(args.image, args.prompts, directions, seed=args.seed, steps=args.steps)
result.save(args.output)  # the PNG with its settings (showo info prints them)
print(f"canvas {result.extra['canvas_tokens']} tokens; saved {args.output} "
      f"({result.image.width}x{result.image.height})")
