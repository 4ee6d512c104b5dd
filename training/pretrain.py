"""Pretrain a NASiam model:
``accelerate launch training/pretrain.py --genotype runs/search --output_dir runs/model``."""

from nasiam_hf.commands.pretrain import main

if __name__ == "__main__":
    main()
