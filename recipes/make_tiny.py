"""Write the tiny setup (synthetic MERR data and a tiny random Llama): ``python recipes/make_tiny.py OUT_DIR``."""

from mosear_recipes.tiny_setup import main

if __name__ == "__main__":
    main()
