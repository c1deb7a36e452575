"""Inpainting: repaint the white part of a mask, guided by a prompt.

    python examples/inpaint.py photo.png mask.png "a red double-decker bus" --seed 0
"""

import argparse

import showo_mlx.pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("image")
parser.add_argument("mask", help="white = repaint, black = keep")
parser.add_argument("prompt")
parser.add_argument("--model", default="showlab/show-o", help="Hub id or local folder")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, help="MaskGIT steps (default 16)")
parser.add_argument("--output", default="inpainted.png")
args = parser.parse_args()

pipe = showo_mlx.pipeline.load(args.model)
(result,) = pipe.inpaint(args.image, args.mask, args.prompt, seed=args.seed, steps=args.steps)
result.save(args.output)  # the PNG with its settings (showo info prints them)
print(f"repainted {result.extra['repainted_tokens']} tokens; saved {args.output} "
      f"({result.image.width}x{result.image.height})")
