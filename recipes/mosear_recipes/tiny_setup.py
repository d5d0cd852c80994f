"""Write the tiny configuration: a synthetic MERR dataset and a tiny random Llama with a matching tokenizer.

    python -m mosear_recipes.tiny_setup OUT_DIR [--num_samples 300] [--seed 0]

gives ``OUT_DIR/data`` (annotation files, JSON, CSV, features, ``feature_spec.json``) and ``OUT_DIR/model``
(loadable with ``--model_name_or_path OUT_DIR/model``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .emotion_llama.tiny import write_tiny_model
from .merr.synthetic import SyntheticMERR, synthetic_corpus, write_synthetic_merr


@dataclass(frozen=True)
class TinySetup:
    data: SyntheticMERR
    model_dir: Path


def write_tiny_setup(out_dir: str | Path, num_samples: int = 300, seed: int = 0, **synthetic: Any) -> TinySetup:
    """Write the synthetic dataset to ``out_dir/data`` (``synthetic``: more options of
    :func:`~mosear_recipes.merr.synthetic.write_synthetic_merr`, e.g. a conflict set's) and the tiny model to
    ``out_dir/model``."""
    out_dir = Path(out_dir)
    data = write_synthetic_merr(out_dir / "data", num_samples=num_samples, seed=seed, **synthetic)
    model_dir = write_tiny_model(out_dir / "model", synthetic_corpus(), seed=seed)
    return TinySetup(data=data, model_dir=model_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Write the tiny setup to the folder given on the command line (``python -m mosear_recipes.tiny_setup``,
    ``recipes/make_tiny.py``)."""
    parser = argparse.ArgumentParser(
        prog="python -m mosear_recipes.tiny_setup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="gets data/ and model/")
    parser.add_argument("--num_samples", type=int, default=300, help="synthetic samples (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    args = parser.parse_args(argv)
    setup = write_tiny_setup(args.out_dir, args.num_samples, args.seed)
    print(f"data: {setup.data.root}\nmodel: {setup.model_dir}")


if __name__ == "__main__":
    main()
