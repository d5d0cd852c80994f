"""Fine-tune the Qwen2.5-Omni thinker with MoSE on raw clips (.mp4 with audio, or .mp4 + .wav), on HF ``Trainer``.

    python recipes/omni_finetune.py --output_dir runs/omni_tiny          # built-in tiny default (configs/omni_tiny.yaml)
    python recipes/omni_finetune.py recipes/configs/omni_7b.yaml --model_name_or_path Qwen/Qwen2.5-Omni-7B \\
        --train_manifest clips/train.csv --eval_manifest clips/test.csv --output_dir runs/omni

Options, manifest format and outputs: docs/omni.md.
"""

from mosear_recipes.omni.finetune import cli

if __name__ == "__main__":
    cli()
