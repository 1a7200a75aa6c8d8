"""The command line from a checkout: ``python cli.py ...``, ``torchrun ... -m cli ...``, ``accelerate launch -m cli ...``.

The app itself is composer/cli.py; installed, it is the ``prompt-composer`` script and ``python -m composer``.
"""
from composer.cli import cli, main  # noqa: F401  (re-exported: `import cli; cli.cli`)

if __name__ == "__main__":
    main()
