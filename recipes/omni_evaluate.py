"""Score a trained omni run or a base Qwen2.5-Omni model on a manifest of raw clips, one row per attention strategy.

    python recipes/omni_evaluate.py --run_dir runs/omni_tiny --manifest clips.jsonl --out_dir out/eval \
        --strategies none,ar,pai --labels happy,sad,angry

Options: ``python recipes/omni_evaluate.py --help``; docs/omni.md.
"""

from mosear_recipes.omni.evaluate import main

if __name__ == "__main__":
    main()
