"""Linear evaluation:
``accelerate launch training/linear_eval.py --model_name_or_path runs/model --dataset_name cifar10``."""

from nasiam_hf.commands.linear_eval import main

if __name__ == "__main__":
    main()
