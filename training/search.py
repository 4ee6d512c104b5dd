"""Run NASiam's architecture search:
``accelerate launch training/search.py --dataset_name demo --output_dir runs/x``."""

from nasiam_hf.commands.search import main

if __name__ == "__main__":
    main()
