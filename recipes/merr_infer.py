"""Answer about one sample with a trained run (MoSE) or the base model (Emotion-LLaMA), greedily, with and without
attention reallocation; prints "<strategy>: <answer>" per strategy.

    python recipes/merr_infer.py --run_dir runs/stage2 --sample_id sample_00000001     # a MERR sample of the run's data
    python recipes/merr_infer.py --run_dir runs/stage2 --data_root /data/MERR --sample_id samplenew_00000012 \\
        --task reason_v2 --strategies none,ar,pai --tau 0.5
    python recipes/merr_infer.py --model_name_or_path Llama-2-7b-chat-hf --projector_checkpoint Emotion_LLaMA.pth \\
        --eva_file clip/EVA_448.npy --face_file clip/mae_340_UTT.npy --video_file clip/maeV_399_UTT.npy \\
        --audio_file clip/HL-UTT.npy --subtitle "I did not expect to see you here"           # one sample's own files

Options: ``python recipes/merr_infer.py --help``; data formats: docs/recipes.md.
"""

from mosear_recipes.inference import main

if __name__ == "__main__":
    main()
