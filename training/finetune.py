"""Fine-tune a NASiam backbone for classification:
``accelerate launch training/finetune.py --model_name_or_path runs/model --dataset_name cifar10 \
--output_dir runs/ft``."""

from nasiam_hf.commands.finetune import main

if __name__ == "__main__":
    main()
