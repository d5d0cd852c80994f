"""Score emotion predictions, or generate them with a trained run or the base model (with and without attention
reallocation) first: ``python recipes/merr_evaluate.py --help``; file formats in docs/evaluation.md."""

import sys

from mosear_recipes.evaluate_cli import main

if __name__ == "__main__":
    sys.exit(main())
