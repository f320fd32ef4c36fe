"""Training entry point (Hydra + DeepSpeed). Lands with issue #5; until then it says so and exits."""
import sys


def main() -> int:
    sys.stderr.write(
        "train.py is not implemented yet: the training loop (Hydra configs, data pipeline, DeepSpeed, "
        "checkpoints) lands with issue #5. The parallel-RNN engine is usable today: see README.md.\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
