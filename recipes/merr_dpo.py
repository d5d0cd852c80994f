"""DPO of a MoSE Emotion-LLaMA on consistency-aware preference pairs, on TRL's ``DPOTrainer``.

    python recipes/merr_dpo.py --output_dir OUT                         # built-in tiny default (configs/dpo_tiny.yaml)
    python recipes/merr_dpo.py recipes/configs/dpo_tiny.yaml --max_steps 8   # a config file, then overrides
    python recipes/merr_dpo.py --model_name_or_path Llama-2-7b-chat-hf --data_root MERR --init_from runs/stage2 \\
        --pairs pairs.jsonl --output_dir runs/dpo --beta 0.1 --learning_rate 5e-6

Options, the pair format and the reference model: docs/preference.md.
"""

from mosear_recipes.preference.dpo import cli

if __name__ == "__main__":
    cli()
