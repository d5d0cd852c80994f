"""Answer about one clip with a trained omni run or a base Qwen2.5-Omni model, under an attention strategy.

    python recipes/omni_infer.py --run_dir runs/omni_tiny --video clip.mp4 [--audio clip.wav] [--strategy ar --tau 0.5]
    python recipes/omni_infer.py --model_name_or_path Qwen/Qwen2.5-Omni-7B --video clip.mp4 --no_audio --verbose

Options: ``python recipes/omni_infer.py --help``; docs/omni.md.
"""

from mosear_recipes.omni.infer import main

if __name__ == "__main__":
    main()
