"""prompt-composer: build a task's soft prompt out of the prompts of related tasks."""
__version__ = "0.1.0"
