"""``python -m composer ...`` (and ``accelerate launch -m composer ...``, ``torchrun ... -m composer ...``):
the prompt-composer command line."""
from composer.cli import main

if __name__ == "__main__":
    main()
