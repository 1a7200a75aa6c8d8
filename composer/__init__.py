"""prompt-composer: build a task's soft prompt out of the prompts of related tasks.

The package is flat; a module a concept. Read it in this order:

    config       every run's settings and every choice list (standard library only; the CLI reads it)
    errors       the domain errors; each is shown to a CLI user as one line
    tasks        a task spec (tasks/NAME.yaml): data, template, labels, metric; the catalogue
    taskdata     a task's rows: file/hub/built-in readers, checked columns, splits, k-shot samples
    suite        the built-in generated tasks (polarity, negation, topic and their compositions)
    encoding     rows -> token ids: the one template renderer, truncation that keeps it, Encoded splits
    backbones    load a Hugging Face model by alias, path or hub id (offline aliases: minilm, smollm2-135m)
    prompts      soft prompts: the [P, H] parameter, its initialisations, the prepend math
    heads        how a prompted backbone scores labels (verbalizer, label-similarity, mlm, linear)
    model        PromptedModel / MultiTaskModel; build_model and from_library assemble them
    attention    ATTEMPT's per-example mixture of prompts, and it as a prompt source
    mixing       composition math: weighted average, linear combination (scipy), best-of-k, concat
    similarity   prompt similarity metrics (cos/euclid on averaged or token-wise prompts, activation overlap)
    evaluate     logits, probabilities and the task metric over a split
    metrics      the metrics themselves
    loop         what the two training loops share: optimizer, one step, the run folder, the split choice
    runstate     checkpoints written whole, batch plans that make resuming exact, the progress bar
    train        single-task training (prompt or joint)
    multitask    many tasks at once, mixed batches, an optional shared attention module
    graph        the task graph (networkx): roles, part_of and similar edges, validation
    graph_io     the graph's file formats (YAML, node-link JSON)
    transfer     zero-shot transfer matrices, similarity matrices, linking a graph from the library
    compose      a target's prompt from its graph neighbours with one of the strategies
    library      the prompt library on disk (safetensors + JSON, atomic, concurrent-safe)
    peft_io      export to / import from PEFT prompt-tuning adapters
    atomic       atomic file and folder writes
    plots        the pictures (learning curves, heatmaps, the graph)
    demo         the whole pipeline on the built-in suite, with its report
    cli          the click command line (`prompt-composer`, `python -m composer`)
"""
__version__ = "0.1.0"
