"""Ask a question about an image; the answer is printed as it is decoded.

    python examples/ask.py photo.png "What is shown in this image?"
"""

import argparse

import showo_mlx.pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("image")
parser.add_argument("question", nargs="?", default="What is shown in this image? Describe it briefly.")
parser.add_argument("--model", default="showlab/show-o", help="Hub id or local folder")
parser.add_argument("--max-tokens", type=int, default=100)
args = parser.parse_args()

pipe = showo_mlx.pipeline.load(args.model)
for piece in pipe.stream_ask(args.image, args.question, max_tokens=args.max_tokens):
    print(piece, end="", flush=True)
print()

# The same question without streaming: pipe.ask(image, question) returns the whole answer.
