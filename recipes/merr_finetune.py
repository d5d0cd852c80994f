"""Fine-tune Emotion-LLaMA with MoSE on MERR, one stage per run (MoSEAR section 6.1), on HF ``Trainer``.

    python recipes/merr_finetune.py                                  # built-in tiny default (configs/tiny.yaml)
    python recipes/merr_finetune.py recipes/configs/tiny.yaml --max_steps 20      # a config file, then overrides
    deepspeed --num_accelerators 4 recipes/merr_finetune.py recipes/configs/merr_stage1.yaml \\
        --model_name_or_path Llama-2-7b-chat-hf --data_root MERR --projector_checkpoint minigptv2_checkpoint.pth \\
        --output_dir runs/stage1
    deepspeed --num_accelerators 4 recipes/merr_finetune.py recipes/configs/merr_stage2.yaml \\
        --model_name_or_path Llama-2-7b-chat-hf --data_root MERR --projector_checkpoint minigptv2_checkpoint.pth \\
        --init_from runs/stage1 --output_dir runs/stage2
    accelerate launch --config_file recipes/configs/accelerate_zero2.yaml recipes/merr_finetune.py ...

Options, config files and outputs: docs/recipes.md.
"""

from mosear_recipes.finetune import cli

if __name__ == "__main__":
    cli()
