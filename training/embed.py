"""Embed every image of a folder, file or dataset with a NASiam model (each process writes its own shards):
``accelerate launch training/embed.py --model_name_or_path runs/model --train_dir photos --output_dir runs/emb``."""

from nasiam_hf.commands.embed import main

if __name__ == "__main__":
    main()
