"""Every run's settings and every choice list, in one place (standard library only: no torch).

The command line reads its defaults, choices and help from these fields (``help`` and ``choices`` in each
field's metadata; ``flag`` where the option's name differs from the field's), so a new setting is added
here once. Cross-field rules are checked in ``__post_init__`` with a message naming the flags and the fix.

    TuningConfig        what single-task and multi-task training share
      TrainConfig       one task                       (composer/train.py)
      MultiTaskConfig   many tasks, mixed batches      (composer/multitask.py)
    ComposeConfig       a target's prompt from a graph (composer/compose.py)
    DemoConfig          the whole pipeline on the built-in suite (composer/demo.py)

Names: ``backbone`` (a string here) is what to load: an alias, a local path or a hub id; the CLI calls it
``--model``, as transformers users expect. ``label_temperature`` scales the label-similarity head's cosine,
``sampling_temperature`` flattens multi-task sampling, ``mix_temperature`` is the softmax temperature over
candidate prompts when composing. Older config.json files (``model``, ``temperature``) still load.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from composer.errors import BackboneError, ComposeError, TrainingError
from composer.names import check_name, check_prefix

# -- the choices ----------------------------------------------------------------------------------
FAMILIES = ("encoder", "decoder", "encoder-decoder")
HEADS = ("verbalizer", "label-similarity", "mlm", "linear")
DEFAULT_HEAD = {"encoder": "label-similarity", "decoder": "verbalizer", "encoder-decoder": "verbalizer"}
KINDS = ("prompt", "prefix")
# where an input-level prompt goes on a BERT-style encoder: [CLS] prompt text | prompt [CLS] text (PEFT's)
POSITIONS = ("after-cls", "front")
"""prompt: P vectors in front of the input embeddings; prefix: P keys and values in front of every attention
layer's (deep prompt tuning: prefix tuning, P-tuning v2; composer/prefix.py)."""
INITS = ("random", "vocab", "text", "library")
"""Prompt initialisations; ``text`` and ``library`` also take an argument (text:WORDS, library:NAME)."""
MODES = ("prompt", "joint")
ADAPTERS = ("none", "lora")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")
MULTITASK_COMPOSERS = ("none", "attention")
MULTITASK_SHARED = ("none", "mpt", "mixture")
"""none: each task its own prompt; mpt: one shared prompt and a rank-1 multiplier per task (composer/mpt.py);
mixture: one prompt for every task, trained on their mixture (SPoT's multi-task source), each task its own head."""
MIXING_STRATEGIES = ("best", "average", "linear", "attention", "concat")
MERGING_STRATEGIES = ("arithmetic", "ties")
"""Task-vector merges (composer/merging.py): each candidate minus its init, summed or TIES-merged onto a base."""
STRATEGIES = (*MIXING_STRATEGIES, *MERGING_STRATEGIES)
LINEAR_METHODS = ("lbfgs", "powell", "nelder-mead")
SIMILARITY_METRICS = ("cos-avg", "euclid-avg", "cos-tok", "euclid-tok", "on")
LINK_METRICS = (*SIMILARITY_METRICS, "transfer")
"""What `graph link` can measure: a similarity of prompts, or the zero-shot transfer score."""
EDGE_METRICS = (*LINK_METRICS, "prior")
"""What a similar edge's ``metric`` may say (``prior``: a weight written by hand)."""
SPLITS = ("train", "dev", "test")
DEVICE_HELP = "Where the backbone runs: auto (CUDA when there is one) | cpu | cuda | cuda:N."


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None,
        flag: str | None = None, **kw) -> Any:
    """A dataclass field with the CLI's help (and choices, flag name) in its metadata."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if flag is not None:
        meta["flag"] = flag
    return field(default=default, metadata=meta, **kw)


def check_device_name(name: str) -> None:
    """auto | cpu | cuda | cuda:N, and a CUDA device this machine has (one-line BackboneError otherwise)."""
    if name != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise BackboneError(f"bad --device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        # lazy: torch is heavy, and a config must load without it (the CLI's --help, config.json reading)
        from composer.backbones import resolve_device

        resolve_device(name)


def parse_unfreeze(spec: str) -> tuple[str, int]:
    """all | bias | none | last:N -> (kind, N)."""
    if spec in ("all", "bias", "none"):
        return spec, 0
    m = re.fullmatch(r"last:(\d+)", spec)
    if not m or int(m.group(1)) <= 0:
        raise TrainingError(f"bad --unfreeze {spec!r}: use all, bias, none or last:N with N >= 1")
    return "last", int(m.group(1))


def defaults(cls) -> dict[str, Any]:
    """{field: default} of a config dataclass (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


class _Config:
    """to_dict / from_dict for the run configs (config.json), reading the names older versions wrote."""

    _renamed: dict[str, str] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def _upgrade(cls, d: dict) -> dict:
        for old, new in cls._renamed.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config"):
        d = cls._upgrade(dict(d))
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"{where}: unknown setting(s) {', '.join(unknown)} for a {cls.__name__}; "
                                "was it written by another kind of run or a newer prompt-composer?")
        return cls(**d)


# -- training -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TuningConfig(_Config):
    """The settings single-task (TrainConfig) and multi-task (MultiTaskConfig) runs share; each sets its defaults."""

    backbone: str | None = opt("minilm", "Backbone: alias (minilm, smollm2-135m), local path or hub id.",
                               flag="--model")
    head: str | None = opt(None, "Scoring head (default: label-similarity on encoders, mlm when the checkpoint "
                                 "has its MLM head, else verbalizer).", choices=HEADS)
    kind: str = opt("prompt", "prompt: virtual tokens in front of the input; prefix: keys and values in front of "
                              "every attention layer (prefix tuning / P-tuning v2; learns on small backbones).",
                    choices=KINDS)
    prompt_length: int = opt(20, "P, the number of virtual tokens (library inits bring their own).")
    prefix_projection: int = opt(0, "--kind prefix: train it through an MLP of this width (folded away on "
                                    "save; 0: no reparameterisation).")
    init: str = opt("random", "Prompt init: random | vocab | text | text:WORDS | library:NAME.")
    mode: str = opt("prompt", "prompt: only the prompt (and head) train; joint: the backbone too.", choices=MODES)
    unfreeze: str = opt("all", "Joint mode, which backbone weights train: all | last:N | bias | none.")
    steps: int = opt(300, "Optimizer steps.")
    batch_size: int = opt(16, "Global batch size (split over processes under accelerate launch).")
    lr: float = opt(0.3, "Learning rate of the prompt (and composer, head).", flag="--lr")
    model_lr: float = opt(2e-5, "Learning rate of the backbone in joint mode.")
    weight_decay: float = opt(0.0, "AdamW weight decay of the prompt parameters.")
    warmup: float = opt(0.06, "Fraction of the steps of linear warm-up.")
    schedule: str = opt("linear", "Learning-rate schedule after warm-up.", choices=SCHEDULES)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm of what trains (0: no clipping).")
    eval_every: int = opt(50, "Steps between dev evaluations.")
    eval_batch_size: int = opt(64, "Batch size of evaluation.")
    max_eval: int | None = opt(1000, "Dev examples used during training (a fixed, seeded subset).")
    max_test: int | None = opt(None, "Examples of the final dev and test evaluation, per task (a fixed, seeded subset; "
                                     "default: the whole splits). A generation task decodes each one: cap it "
                                     "on a CPU.")
    patience: int = opt(0, "Stop after this many evaluations without improvement (0: never).")
    checkpoint_every: int | None = opt(None, "Steps between checkpoints (default: --eval-every).")
    seed: int = opt(0, "Seeds the init, the batches and dropout.")
    k_shot: int | None = opt(None, "Train on k examples per class (seeded).")
    data_dir: str | None = opt(None, "Folder the task's data paths are relative to.")
    label_temperature: float = opt(0.05, "Temperature of the label-similarity head (cosine / T).")
    mixed_precision: str = opt("no", "Mixed precision on a GPU (the CPU trains in fp32).", choices=PRECISIONS)
    gradient_checkpointing: bool = opt(False, "Recompute backbone activations in backward (less memory).")
    run_dir: str | None = opt(None, "Run folder (default runs/SAVE or runs/TASK-TIME).")

    adapter: str = opt("none", "Joint mode: none (the backbone weights --unfreeze picks train) or lora (PEFT's LoRA "
                               "layers train instead, saved beside the prompt).", choices=ADAPTERS)
    lora_r: int = opt(8, "--adapter lora: the rank r.")
    lora_alpha: float = opt(16.0, "--adapter lora: alpha (the update is scaled by alpha / r).")
    lora_dropout: float = opt(0.0, "--adapter lora: dropout on the LoRA input.")
    lora_targets: str | None = opt(None, "--adapter lora: comma-separated module names (default: PEFT's choice "
                                         "for the architecture, the attention query/value projections).")
    lora_lr: float = opt(5e-4, "--adapter lora: learning rate of the LoRA weights.")

    _renamed = {"model": "backbone"}

    def lora_settings(self) -> dict:
        """--adapter lora's settings as composer.lora.add_lora takes them (its targets still unresolved)."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout, "targets": self.lora_targets}

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise TrainingError(f"unknown --adapter {self.adapter!r}: use one of {', '.join(ADAPTERS)}")
        if self.adapter == "lora":
            if self.mode != "joint":
                raise TrainingError("--adapter lora trains beside the prompt in joint mode: add --mode joint")
            if self.unfreeze != "all":
                raise TrainingError(f"--adapter lora trains LoRA weights, not backbone weights: drop --unfreeze "
                                    f"{self.unfreeze}")
            if self.lora_r <= 0 or not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
                raise TrainingError(f"--lora-r and --lora-alpha must be positive, got {self.lora_r} and "
                                    f"{self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                raise TrainingError(f"--lora-dropout is a probability in [0, 1), got {self.lora_dropout}")
            if not (self.lora_lr > 0 and math.isfinite(self.lora_lr)):
                raise TrainingError(f"--lora-lr must be a finite number > 0, got {self.lora_lr}")
        if self.steps <= 0:
            raise TrainingError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise TrainingError(f"--batch-size must be positive, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"the prompt learning rate must be > 0, got {self.lr} (--lr: a finite number)")
        if not math.isfinite(self.model_lr):
            raise TrainingError(f"--model-lr must be a finite number, got {self.model_lr}")
        if self.mode not in MODES:
            raise TrainingError(f"unknown --mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode == "joint" and self.unfreeze != "none" and self.model_lr <= 0:
            raise TrainingError(f"--model-lr is {self.model_lr} but --unfreeze {self.unfreeze} trains the backbone; "
                                "give a positive --model-lr or --unfreeze none")
        if self.prompt_length <= 0:
            raise TrainingError(f"--prompt-length must be positive, got {self.prompt_length}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown --schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise TrainingError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.eval_every <= 0:
            raise TrainingError(f"--eval-every must be positive, got {self.eval_every}")
        if self.patience < 0:
            raise TrainingError(f"--patience must be >= 0, got {self.patience}")
        if self.max_eval is not None and self.max_eval <= 0:
            raise TrainingError(f"--max-eval must be positive (dev examples evaluated during training), got "
                                f"{self.max_eval}")
        if self.max_test is not None and self.max_test <= 0:
            raise TrainingError(f"--max-test must be positive (examples of the final evaluation), got {self.max_test}; "
                                "drop it to evaluate the whole dev and test splits")
        if self.k_shot is not None and self.k_shot <= 0:
            raise TrainingError(f"--k-shot must be positive (training examples per class), got {self.k_shot}; "
                                "drop it to train on the whole train split")
        if self.eval_batch_size <= 0:
            raise TrainingError(f"--eval-batch-size must be positive, got {self.eval_batch_size}")
        if not (self.label_temperature > 0 and math.isfinite(self.label_temperature)):  # also NaN
            raise TrainingError(f"--label-temperature must be > 0, got {self.label_temperature}")
        if self.mixed_precision not in PRECISIONS:
            raise TrainingError(f"unknown --mixed-precision {self.mixed_precision!r}: use one of "
                                f"{', '.join(PRECISIONS)}")
        if self.kind not in KINDS:
            raise TrainingError(f"unknown --kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.prefix_projection < 0:
            raise TrainingError(f"--prefix-projection must be >= 0, got {self.prefix_projection}")
        if self.prefix_projection and self.kind != "prefix":
            raise TrainingError("--prefix-projection reparameterises a prefix: add --kind prefix or drop it")
        if self.kind == "prefix" and self.gradient_checkpointing:
            raise TrainingError("--kind prefix with --gradient-checkpointing: recomputing a layer in backward "
                                "would append the prefix to its keys a second time; drop one of the two")
        parse_unfreeze(self.unfreeze)


@dataclass(kw_only=True)
class TrainConfig(TuningConfig):
    """Everything that defines a single-task run; saved as config.json in the run folder."""

    task: str = opt(help="Task spec name or path to a YAML file.", flag="TASK")
    save: str | None = opt(None, "Save the best prompt to the library under this name.")
    prompt_position: str = opt("after-cls", "Where an input-level prompt goes on a BERT-style encoder: after-cls "
                                            "([CLS] prompt text) | front (prompt [CLS] text, PEFT's placement: "
                                            "its PromptTuning export gives the same outputs). Other backbones: "
                                            "always in front.", choices=POSITIONS)

    @classmethod
    def _upgrade(cls, d: dict) -> dict:
        if "label_temperature" not in d and "temperature" in d:
            d["label_temperature"] = d.pop("temperature")  # single-task runs before the rename
        return super()._upgrade(d)

    def __post_init__(self):
        if self.save is not None:  # a name is a folder (runs/NAME): checked before anything is written
            check_name(self.save, "--save")
        if not self.backbone:
            raise TrainingError("a single-task run needs a backbone: give --model (e.g. minilm)")
        if self.prompt_position not in POSITIONS:
            raise TrainingError(f"unknown --prompt-position {self.prompt_position!r}: use one of {', '.join(POSITIONS)}")
        super().__post_init__()


@dataclass(kw_only=True)
class MultiTaskConfig(TuningConfig):
    """Everything that defines a multi-task run; saved as config.json in the run folder.

    The settings it shares with a single-task run are TuningConfig's; these are its own, and the shared ones
    whose defaults differ (more steps, larger mixed batches, rarer and smaller evals)."""

    tasks: list[str] | None = opt(None, "Comma-separated task names (or give --graph).")
    graph: str | None = opt(None, "Every task of this graph (the node name is the task's key).")
    backbone: str | None = opt(None, "Backbone: alias, path or hub id (default: the graph's, else minilm).",
                               flag="--model")
    head: str | None = opt(None, "One head for every task (default: each task's own).", choices=HEADS)
    init: str = opt("random", "random | vocab | text | library (each task from its graph node's prompt, else "
                              "the entry named like the task) | library:NAME (every task from one entry).")
    composer: str = opt("none", "none: one soft prompt per task; attention: one attention module shared "
                                "across tasks over the graph's source prompts (ATTEMPT).",
                        choices=MULTITASK_COMPOSERS)
    sources: list[str] | None = opt(None, "attention: library prompts to attend over (default: the graph's "
                                          "source and subtask prompts).")
    attention_rank: int = opt(32, "attention: size of the shared down-projection.")
    shared: str = opt("none", "none: one soft prompt per task; mpt: one shared prompt, each task's a rank-1 "
                              "multiple of it, distilled from the tasks' library prompts (MPT; the graph's "
                              "source and subtask nodes; saved as PREFIX+shared); mixture: one prompt for "
                              "every task, trained on their mixture (SPoT's multi-task source; each task keeps "
                              "its own head; PREFIX+shared is the step with the best mean dev score).",
                      choices=MULTITASK_SHARED)
    distill_kl: float = opt(1.0, "mpt: weight of the KL from each teacher's label (or token) distribution.")
    distill_hidden: float = opt(1.0, "mpt: weight of the MSE to each teacher's last hidden states.")
    steps: int = opt(1000, "Optimizer steps.")
    batch_size: int = opt(32, "Global batch size, mixed over tasks.")
    sampling_temperature: float = opt(1.0, "Task i is drawn in proportion to n_i ** (1/T): 1 samples by size, "
                                           "a large T uniformly.", flag="--temperature")
    eval_every: int = opt(100, "Steps between dev evaluations.")
    max_eval: int | None = opt(500, "Dev examples per task used during training (a fixed, seeded subset).")
    save_prefix: str | None = opt(None, "Save each task's best prompt as PREFIX+TASK.")

    _renamed = {"model": "backbone", "temperature": "sampling_temperature"}

    def __post_init__(self):
        if self.save_prefix is not None:  # each task's name (PREFIX+TASK) is checked once the tasks are known
            check_prefix(self.save_prefix)
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if isinstance(self.sources, str):
            self.sources = [s.strip() for s in self.sources.split(",") if s.strip()]
        if bool(self.tasks) == bool(self.graph):
            raise TrainingError("multitask training needs either --tasks a,b,... or --graph G (not both, not "
                                f"neither); got tasks={self.tasks!r}, graph={self.graph!r}")
        if not self.sampling_temperature > 0:  # also NaN
            raise TrainingError(f"--temperature must be > 0 (task i is sampled in proportion to "
                                f"n_i ** (1/T)), got {self.sampling_temperature}; use 1 to sample by size, a "
                                "large value for uniform")
        if self.composer not in MULTITASK_COMPOSERS:
            raise TrainingError(f"unknown --composer {self.composer!r}: use one of "
                                f"{', '.join(MULTITASK_COMPOSERS)}")
        if self.composer == "attention" and self.init != "random":
            raise TrainingError(f"--init {self.init} does not apply with --composer attention: each task's "
                                "target prompt starts at zeros (its first prompt is the mixture of the "
                                "sources); drop --init")
        if self.attention_rank < 1:
            raise TrainingError(f"--attention-rank must be >= 1, got {self.attention_rank}")
        if self.shared not in MULTITASK_SHARED:
            raise TrainingError(f"unknown --shared {self.shared!r}: use one of {', '.join(MULTITASK_SHARED)}")
        if self.shared == "mpt" and self.adapter == "lora":
            raise TrainingError("--shared mpt with --adapter lora: the teachers' outputs are computed through the "
                                "same backbone, which LoRA would change under them; distil first (--shared mpt), "
                                "then adapt a target with --mode joint --adapter lora")
        for name in ("distill_kl", "distill_hidden"):
            w = getattr(self, name)
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise TrainingError(f"{name} must be a finite number >= 0, got {w!r}")
        if self.shared == "mpt":
            if self.composer != "none":
                raise TrainingError(f"--shared mpt with --composer {self.composer}: each is its own way to share "
                                    "across tasks; drop one")
            if self.init.startswith("library"):
                raise TrainingError(f"--init {self.init} does not apply with --shared mpt: the shared prompt "
                                    "starts at the mean of the tasks' own library prompts (the teachers); drop --init")
            if self.prefix_projection:
                raise TrainingError("--prefix-projection does not apply with --shared mpt (the shared prefix "
                                    "trains directly); drop it")
        if self.shared == "mixture":
            if self.composer != "none":
                raise TrainingError(f"--shared mixture with --composer {self.composer}: each is its own way to "
                                    "share across tasks; drop one")
            if self.init == "library":
                raise TrainingError("--init library starts each task from its own prompt, and --shared mixture "
                                    "trains one prompt for all: give --init random, vocab, text or library:NAME")
        super().__post_init__()  # the checks every run makes (steps, lr, mode, unfreeze, ...)


# -- composing ------------------------------------------------------------------------------------
@dataclass
class ComposeConfig(_Config):
    """A target's prompt from its graph neighbours (composer/compose.py)."""

    graph: str = opt(help="Graph YAML or node-link JSON (a name resolves in ./graphs then the catalogue).",
                     flag="GRAPH")
    target: str = opt(help="Target node of the graph.")
    strategy: str = opt("attention", "How the candidates become one prompt.", choices=STRATEGIES)
    top_k: int = opt(3, "How many similar sources join the subtasks.")
    metric: str | None = opt(None, "Follow similar edges of this metric (default: any one).")
    shots: int = opt(16, "Target examples per class used by best, linear and attention.")
    method: str = opt("lbfgs", "linear: lbfgs (gradient-based) | powell | nelder-mead (gradient-free).",
                      choices=LINEAR_METHODS)
    l1: float = opt(0.05, "linear: L1 penalty on the weights.")
    min_weight: float = opt(-1.5, "linear: the lowest weight a candidate may get (LoraHub's box is [-1.5, 1.5]; "
                                  "0 keeps the weights non-negative).")
    max_weight: float = opt(1.5, "linear: the highest weight a candidate may get.")
    mix_temperature: float | None = opt(None, "average: softmax temperature over the similarities (default: "
                                              "weights normalised by their sum); attention: default H * e.",
                                        flag="--temperature")
    steps: int = opt(0, "attention: fit the module on the shots first; best: tune each candidate this many "
                        "steps on the shots before scoring it (SPoT; 0 = zero-shot scores).")
    lr: float = opt(0.3, "Learning rate of those steps.")
    distill: bool = opt(False, "attention: save one static prompt (the mean mixture) instead of the module.")
    seed: int = opt(0, "Seeds the shots and the composer.")
    backbone: str | None = opt(None, "Backbone (default: the graph's, else the candidates').", flag="--model")
    data_dir: str | None = opt(None, "Folder the task's data paths are relative to.")
    save: str | None = opt(None, "Library name for the composed prompt.")
    out_graph: str | None = opt(None, "Write the graph with the composed weights on its edges (node-link JSON).",
                                flag="--out")
    device: str = opt("auto", DEVICE_HELP)
    base: str | None = opt(None, "arithmetic, ties: where the merged task vector lands, and what the task vectors "
                                 "are taken against when it is given: a library entry NAME of the candidates' "
                                 "shape | zeros (the prompts themselves are the vectors) (default: the mean of "
                                 "the candidates' inits, recovered from their provenance).")
    density: float | None = opt(None, "ties, arithmetic: keep this fraction of each task vector's entries, the "
                                      "largest by magnitude, in (0, 1] (default: 0.2 for ties, 1 for arithmetic).")
    dare: float = opt(0.0, "ties, arithmetic: DARE, drop each task-vector entry with this probability and "
                           "rescale the rest by 1/(1-p), before trimming; in [0, 1).")
    scale: float = opt(1.0, "ties, arithmetic: multiply the merged task vector by this before adding it to the "
                            "base (task arithmetic's lambda).")

    _renamed = {"model": "backbone", "temperature": "mix_temperature"}

    def __post_init__(self):
        if self.save is not None:
            check_name(self.save, "--save")
        if self.strategy not in STRATEGIES:
            raise ComposeError(f"unknown --strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.top_k < 0:
            raise ComposeError(f"--top-k must be >= 0, got {self.top_k}")
        if self.shots <= 0:
            raise ComposeError(f"--shots must be positive, got {self.shots}")
        if self.steps < 0:
            raise ComposeError(f"--steps must be >= 0, got {self.steps}")
        if self.method not in LINEAR_METHODS:
            raise ComposeError(f"unknown --method {self.method!r}: use {', '.join(LINEAR_METHODS)}")
        if not (math.isfinite(self.min_weight) and math.isfinite(self.max_weight)
                and self.min_weight < self.max_weight):
            raise ComposeError(f"--min-weight must be below --max-weight, both finite; got {self.min_weight} and "
                               f"{self.max_weight}")
        self._check_merge()
        check_device_name(self.device)

    def _check_merge(self) -> None:
        """The merge options: in range, and only with the strategies that read them."""
        merging = self.strategy in MERGING_STRATEGIES
        given = [flag for flag, v in (("--base", self.base), ("--density", self.density),
                                      ("--dare", self.dare or None), ("--scale", None if self.scale == 1.0 else 1))
                 if v is not None]
        if given and not merging:
            raise ComposeError(f"{', '.join(given)} applies to --strategy arithmetic or ties, not "
                               f"{self.strategy}; drop it or pick one of those")
        if merging and self.mix_temperature is not None:
            raise ComposeError(f"--temperature does not apply to --strategy {self.strategy}: it takes the edge "
                               "weights as they are; scale the merged vector with --scale")
        if self.density is not None and not (math.isfinite(self.density) and 0 < self.density <= 1):
            raise ComposeError(f"--density (the trim fraction: the share of each task vector kept) must be in "
                               f"(0, 1], got {self.density}; e.g. 0.2 keeps the largest 20%")
        if not (math.isfinite(self.dare) and 0 <= self.dare < 1):
            raise ComposeError(f"--dare (the drop probability) must be in [0, 1), got {self.dare}; 0 drops nothing")
        if not math.isfinite(self.scale):
            raise ComposeError(f"--scale must be a finite number, got {self.scale}")
        if self.base is not None and self.base != "zeros":
            check_name(self.base.split(":", 1)[1] if self.base.startswith("library:") else self.base, "--base")


# -- the demo -------------------------------------------------------------------------------------
@dataclass
class DemoConfig(_Config):
    """The whole pipeline on the built-in suite (composer/demo.py)."""

    backbone: str = opt("minilm", "Backbone: alias, path or hub id.", flag="--model")
    graph: str = opt("demo", "The demo's task graph.")
    out: str = opt("runs/demo", "Folder of the report, its pictures and the runs.")
    targets: tuple[str, ...] = opt(("negated-polarity", "topic-polarity"), "Targets to compose.",
                                   flag="--target")
    strategies: tuple[str, ...] = opt(MIXING_STRATEGIES, "Strategies to compare.")
    kind: str = opt("prompt", "What every arm tunes: prompt (virtual tokens) or prefix (keys and values in every "
                              "attention layer; its prompts are named apart; try --lr 0.01).", choices=KINDS)
    prompt_length: int = opt(20, "P of every prompt.")
    source_steps: int = opt(80, "Steps for each subtask prompt (full training data).")
    target_steps: int = opt(40, "The same budget for every arm on a target.")
    k_shot: int = opt(16, "Target training examples per class: composition matters most few-shot.")
    shots: int = opt(16, "Examples per class the composer itself may look at (best, linear, attention).")
    batch_size: int = opt(16, "Batch size of every run.")
    lr: float = opt(0.3, "Prompt learning rate of every run.")
    eval_every: int = opt(10, "Steps between dev evaluations.")
    max_eval: int = opt(200, "Dev examples used during training.")
    seed: int = opt(0, "Seeds every run.")
    retrain: bool = opt(False, "Retrain the subtask prompts even if the library has them.")
    extra: dict = opt(help="Extra settings recorded in the report.", default_factory=dict)

    _renamed = {"model": "backbone"}
