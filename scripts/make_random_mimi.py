"""Write a full-size Mimi with random weights and spread codebooks (385 MB) for trying the codec stage.

    python scripts/make_random_mimi.py /tmp/mimi/mimi.safetensors [--seed 0]
    xbackend codec --codecs torch,mlx:cpu,candle --codec /tmp/mimi/mimi.safetensors

Never commit the file; tests make their own in a temporary directory.
"""

import argparse

from xbackend.testing.mimi import random_mimi

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(random_mimi(args.out, seed=args.seed))
