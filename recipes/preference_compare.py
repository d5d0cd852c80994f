"""The conflict-set comparison of docs/preference.md: LoRA SFT, MoSE SFT, MoSE SFT + AR, MoSE SFT + DPO and
MoSE SFT + DPO + AR on the same synthetic conflict set and seed; accuracy per CA-MER subset and audio-following rate.

    python recipes/preference_compare.py OUT_DIR                 # CI size, minutes on 2 CPU cores
    python recipes/preference_compare.py OUT_DIR --size full
"""

from mosear_recipes.preference.compare import main

if __name__ == "__main__":
    main()
