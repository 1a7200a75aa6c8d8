"""Overhead of one prompt-tuning training step: prompt-composer vs PEFT vs the bare backbone.

For each backbone, on one fixed batch (B rows of exactly T tokens, P prompt tokens), the wall
time of one training step (forward -> cross-entropy over label scores -> backward -> clip -> AdamW):

  (a) prompt-composer: the PromptedModel, head, param groups, optimizer, scheduler and accelerate
      calls of composer/train.py (the step body of its loop, the objects built by its own helpers);
  (b) PEFT PromptTuning (get_peft_model + PromptTuningConfig) with the same loss;
  (c) the bare backbone on inputs_embeds = prompt spliced into the word embeddings, the prompt
      the only tensor that requires grad, the same loss.

Losses. Encoders (minilm): the label-similarity head's loss: cos(mean-pooled last hidden state
over prompt + input, the label-description embeddings, encoded once) / temperature -> CE.
Decoders (smollm2-135m): the verbalizer's loss: log-softmax of the next-token logits at the last
position, gathered at the single-token label words -> CE. (b) and (c) ask the LM head for the last
position only (``logits_to_keep=1``), as composer does, so no arm pays for [B, P+T, V] logits.

Prompt placement: composer puts the prompt after [CLS] on BERT-style encoders; (c) does the same so
that (a) and (c) compute the very same function (checked below); PEFT can only put it in front.
The cost is the same either way (one concatenation of P+T rows).

The arms share one backbone object (one load, same weights, same train/eval mode: train mode,
as composer/train.py runs, so dropout is on in minilm for every arm; --no-dropout turns it off for
all). Before timing, with dropout off, the script checks that the arms' losses and prompt gradients
agree, that each feeds the backbone [B, P+T, H] embeddings, and that each trains exactly P*H
numbers; during timing it checks after every step that the arm's prompt moved.

Run (2 CPU cores):
    python bench/step_overhead.py --models minilm,smollm2-135m --threads 2 --repeats 30,20 \\
        --warmup 5,3 --out bench/step_overhead.json

On a GPU, ``--device cuda`` (``--mixed-precision bf16`` for bf16 autocast in every arm, as
``prompt-composer train --mixed-precision bf16`` runs): each step is timed between two
``torch.cuda.synchronize()`` calls, and the table adds each arm's peak GPU memory in a step.

``--kind prefix``: the same, for a prefix [L, 2, P, D] (keys and values in front of every attention layer,
composer/prefix.py) instead of a prompt:

  (a) prompt-composer: the PromptedModel with a PrefixPrompt (``TrainConfig(kind="prefix")``, its induced
      random init), stepped by composer/loop.py's Optimizer and training_step, as train.py's loop does;
  (b) PEFT PrefixTuning (PrefixTuningConfig, same P, no projection; FEATURE_EXTRACTION on an encoder, with
      the head's loss on its last hidden state), its table [P, L*2*D] copied from (a)'s init;
  (c) the bare backbone's forward + backward with the same past key/values handed in: a DynamicCache built
      each step from one [L, 2, P, D] tensor that requires grad, P ones in front of the mask (the limit).

The checks compare the three in (a)'s layout: same loss and prefix gradient, each hands the stack a cache of
P positions in L layers and a [B, P+T] mask, each trains L*2*P*D numbers. Memory: on a GPU the peak in a
step, as above; on any device, in one extra untimed step per arm, the bytes the autograd graph saves for
backward (each storage once, the backbone's weights left out): the activation memory a step holds at its
peak, the number that differs between the arms (``saved_mib``). Process RSS is not measured (one process
holds all three arms, so it cannot tell them apart).

    python bench/step_overhead.py --kind prefix --models minilm,smollm2-135m --threads 2 \\
        --batch-size 16,8 --repeats 20,10 --warmup 3,2 --out overhead-prefix.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from composer.demo import machine  # noqa: E402

ARMS = ("a", "b", "c")
ARM_NAMES = {"a": "prompt-composer", "b": "PEFT PromptTuning", "c": "bare backbone"}
PREFIX_ARM_NAMES = {"a": "prompt-composer prefix", "b": "PEFT PrefixTuning", "c": "bare backbone + cache"}
DEFAULT_LR = {"prompt": 0.3, "prefix": 0.01}  # issue 20's minilm experiment trained prefixes at 0.01
TASK = "polarity"  # built-in, offline; label words " bad"/" good" are single tokens on SmolLM2


# -- the batch ----------------------------------------------------------------------------------
def fixed_batch(train, tokenizer, family: str, B: int, T: int) -> tuple[torch.Tensor, ...]:
    """B rows of exactly T real tokens (no padding), from the task's own training sentences.

    Each row starts with one training sentence and is filled up with the following ones, so every arm
    sees the same [B, T] ids and an all-ones mask (the last real token is at T-1 for every row).
    -> input_ids [B, T], attention_mask [B, T], labels [B] (the first sentence's label).
    """
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    specials = set(tokenizer.all_special_ids)
    bert_like = family == "encoder" and cls is not None and sep is not None
    n = len(train)
    rows, labels = [], []
    for i in range(B):
        body, j = [], i
        while len(body) < T:
            body += [t for t in train.ids[j % n] if t not in specials]
            j += 1
        rows.append([cls] + body[: T - 2] + [sep] if bert_like else body[:T])
        labels.append(int(train.labels[i]))
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, torch.ones_like(ids), torch.tensor(labels, dtype=torch.long)


def splice(prompt: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, after_first: bool):
    """prompt [P, H], embeds [B, T, H], mask [B, T] -> ([B, P+T, H], [B, P+T])."""
    B = embeds.shape[0]
    p = prompt.unsqueeze(0).expand(B, -1, -1)  # [B, P, H]
    ones = mask.new_ones(B, prompt.shape[0])
    if after_first:  # [CLS] prompt rest
        return torch.cat([embeds[:, :1], p, embeds[:, 1:]], 1), torch.cat([mask[:, :1], ones, mask[:, 1:]], 1)
    return torch.cat([p, embeds], 1), torch.cat([ones, mask], 1)


# -- the three arms ------------------------------------------------------------------------------
class ComposerArm:
    """(a): everything built by composer's own helpers; step() is the body of composer/train.py's loop.

    ``kind`` "prompt": the step body as this benchmark first timed it (its own backward, clip, AdamW, schedule
    calls, kept so that the prompt table stays comparable); "prefix": composer/loop.py's Optimizer, seed_step
    and training_step, exactly what train.py's loop calls now."""

    def __init__(self, bb, P: int, B: int, lr: float, steps: int, precision: str = "no",
                 kind: str = "prompt"):
        from accelerate import Accelerator

        from composer.loop import Optimizer, RunFolder, param_groups
        from composer.runstate import lr_lambda
        from composer.train import TrainConfig, prepare

        self.kind = kind
        self.cfg = TrainConfig(task=TASK, backbone=bb.name, prompt_length=P, batch_size=B, lr=lr, steps=steps,
                               warmup=0.0, schedule="constant", seed=0, kind=kind)
        self.prep = prepare(self.cfg, backbone=bb)  # data, random init prompt/prefix, default head, model
        self.acc = Accelerator(cpu=bb_device(bb).type == "cpu", mixed_precision=precision)
        model = self.prep.model
        if kind == "prefix":
            self.opt = Optimizer(self.cfg, model)  # freezes the backbone; AdamW + schedule over the prefix
            self.optimizer = self.opt.optimizer
            self.run = RunFolder(Path(tempfile.gettempdir()) / "step-overhead", self.acc)  # named on error
        else:
            self.optimizer = torch.optim.AdamW(param_groups(self.cfg, model))  # freezes the backbone
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lr_lambda(self.cfg.schedule, 0, self.cfg.steps))
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        if kind == "prefix":  # training_step steps the wrapped optimizer, as train.py's loop hands it over
            self.opt.optimizer = self.optimizer
        self.core = self.acc.unwrap_model(self.model)
        self.step_no = 0

    def prompt(self) -> torch.Tensor:
        return self.core.prompt_source.weight  # [P, H], or a prefix [L, 2, P, D]

    def as_prefix(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss(self, ids, mask, labels) -> torch.Tensor:
        acc, cfg = self.acc, self.cfg
        torch.manual_seed(cfg.seed * 1_000_003 + self.step_no)  # as train.py: dropout masks follow the step
        with acc.autocast():
            logits = self.model(ids.to(acc.device), mask.to(acc.device))
            loss = F.cross_entropy(logits.float(), labels.to(acc.device))
        return loss

    def step(self, ids, mask, labels) -> torch.Tensor:
        acc, cfg = self.acc, self.cfg
        if self.kind == "prefix":  # train.py's loop body: seed_step, forward under autocast, training_step
            from composer.loop import seed_step, training_step

            seed_step(cfg.seed, self.step_no, acc.device)
            with acc.autocast():
                loss = F.cross_entropy(self.model(ids.to(acc.device), mask.to(acc.device)).float(),
                                       labels.to(acc.device))
            training_step(acc, loss, self.opt, cfg.max_grad_norm, self.step_no, self.run, cfg.lr)
            self.step_no += 1
            return loss.detach()
        loss = self.loss(ids, mask, labels)
        if not torch.isfinite(loss):
            raise RuntimeError(f"(a) loss became {loss.item()}")
        acc.backward(loss)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1
        return loss.detach()


@dataclass
class Loss:
    """The loss of (b) and (c), the same as the composer head's: scores [B, C] -> cross-entropy."""

    decoder: bool
    label_ids: torch.Tensor | None  # [C] single-token label words (decoders)
    label_emb: torch.Tensor | None  # [C, H] unit label-description embeddings (encoders)
    temperature: float
    max_grad_norm: float
    precision: str = "no"  # "bf16": the backbone's forward under bf16 autocast, as accelerate's in (a)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, out, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """out: the backbone's output; mask [B, P+T]; labels [B]."""
        if self.decoder:  # out.logits [B, 1, V]: the last position only (logits_to_keep=1)
            scores = F.log_softmax(out.logits[:, -1].float(), dim=-1)[:, self.label_ids]  # [B, C]
        else:
            hidden = out.last_hidden_state  # [B, P+T, H]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)  # [B, H]
            scores = F.normalize(pooled.float(), dim=-1) @ self.label_emb.T / self.temperature  # [B, C]
        return F.cross_entropy(scores, labels)

    def kwargs(self) -> dict:
        return {"logits_to_keep": 1} if self.decoder else {}


def update(loss: torch.Tensor, params: list[torch.Tensor], optimizer, max_grad_norm: float) -> torch.Tensor:
    """The plain step of (b) and (c): backward, clip, AdamW."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class PeftArm:
    """(b): PEFT PromptTuning on the same backbone object, its prompt copied from (a)'s init."""

    def __init__(self, bb, P: int, init: torch.Tensor, lr: float, loss: Loss):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        task_type = TaskType.CAUSAL_LM if bb.family == "decoder" else TaskType.FEATURE_EXTRACTION
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated is_gradient_checkpointing alias (its FutureWarning is
            # PEFT's to fix, not something a user of this benchmark can act on)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = get_peft_model(bb.model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=P))
        with torch.no_grad():
            self.prompt().copy_(init)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.P, self.loss_fn = P, loss

    def prompt(self) -> torch.Tensor:
        return self.model.prompt_encoder["default"].embedding.weight

    def loss(self, ids, mask, labels) -> torch.Tensor:
        with self.loss_fn.autocast(ids.device):
            out = self.model(input_ids=ids, attention_mask=mask, **self.loss_fn.kwargs())
        full = torch.cat([mask.new_ones(mask.shape[0], self.P), mask], 1)  # [B, P+T], as PEFT builds it
        return self.loss_fn(out, full, labels)

    def step(self, ids, mask, labels) -> torch.Tensor:
        return update(self.loss(ids, mask, labels), self.params, self.optimizer, self.loss_fn.max_grad_norm)


class BareArm:
    """(c): the backbone's own forward on spliced embeddings; only the [P, H] prompt requires grad."""

    def __init__(self, bb, init: torch.Tensor, lr: float, loss: Loss, after_first: bool):
        self.bb = bb
        self.weight = nn.Parameter(init.detach().clone())
        self.optimizer = torch.optim.AdamW([self.weight], lr=lr, weight_decay=0.0)
        self.loss_fn, self.after_first = loss, after_first

    def prompt(self) -> torch.Tensor:
        return self.weight

    def loss(self, ids, mask, labels, after_first: bool | None = None) -> torch.Tensor:
        after_first = self.after_first if after_first is None else after_first
        model = self.bb.model
        embeds = model.get_input_embeddings()(ids)  # [B, T, H]
        x, m = splice(self.weight, embeds, mask, after_first)  # [B, P+T, H], [B, P+T]
        with self.loss_fn.autocast(ids.device):
            out = model(inputs_embeds=x, attention_mask=m, **self.loss_fn.kwargs())
        return self.loss_fn(out, m, labels)

    def step(self, ids, mask, labels) -> torch.Tensor:
        return update(self.loss(ids, mask, labels), [self.weight], self.optimizer, self.loss_fn.max_grad_norm)


# -- the prefix arms (--kind prefix) --------------------------------------------------------------
def prefix_to_peft(prefix: torch.Tensor) -> torch.Tensor:
    """Ours [L, 2, P, D] -> PEFT PrefixTuning's table [P, L*2*D] (decoders and encoders: layer l's key is row
    block 2l, its value 2l+1, as PEFT's get_prompt splits it)."""
    L, _, P, D = prefix.shape
    return prefix.permute(2, 0, 1, 3).reshape(P, L * 2 * D)


def peft_to_prefix(table: torch.Tensor, L: int) -> torch.Tensor:
    """PEFT's [P, L*2*D] -> ours [L, 2, P, D]."""
    P = table.shape[0]
    return table.view(P, L, 2, -1).permute(1, 2, 0, 3)


class PeftPrefixArm:
    """(b) for --kind prefix: PEFT PrefixTuning on the same backbone object, its table from (a)'s init."""

    def __init__(self, bb, P: int, init: torch.Tensor, lr: float, loss: Loss):
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        task_type = TaskType.CAUSAL_LM if bb.family == "decoder" else TaskType.FEATURE_EXTRACTION
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P)
            self.model = get_peft_model(bb.model, config)
        # peft 0.21 hands transformers 5.24+ its cache as the deprecated past_key_values= (PEFT's to fix); a
        # filter here rather than a catch_warnings around each timed step
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        self.L = init.shape[0]
        with torch.no_grad():
            self.prompt().copy_(prefix_to_peft(init))  # refuses a table of another shape
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.loss_fn = loss

    def prompt(self) -> torch.Tensor:
        return self.model.prompt_encoder["default"].embedding.weight  # [P, L*2*D]

    def as_prefix(self, t: torch.Tensor) -> torch.Tensor:
        return peft_to_prefix(t, self.L)

    def loss(self, ids, mask, labels) -> torch.Tensor:
        with self.loss_fn.autocast(ids.device):
            out = self.model(input_ids=ids, attention_mask=mask, **self.loss_fn.kwargs())
        return self.loss_fn(out, mask, labels)  # the hidden states are the T input positions: pool over mask

    def step(self, ids, mask, labels) -> torch.Tensor:
        return update(self.loss(ids, mask, labels), self.params, self.optimizer, self.loss_fn.max_grad_norm)


class BarePrefixArm:
    """(c) for --kind prefix: the backbone's own forward with past key/values handed in, a DynamicCache built
    each step from the one [L, 2, P, D] tensor that requires grad (the cache is filled by the forward, so it
    cannot be reused across steps)."""

    def __init__(self, bb, init: torch.Tensor, lr: float, loss: Loss):
        from composer.prefix import cache_keyword, geometry

        self.bb = bb
        self.geo = geometry(bb.model, bb.family)
        self.keyword = cache_keyword(bb.model)  # "cache" from transformers 5.24, else "past_key_values"
        self.weight = nn.Parameter(init.detach().clone())
        self.optimizer = torch.optim.AdamW([self.weight], lr=lr, weight_decay=0.0)
        self.loss_fn = loss

    def prompt(self) -> torch.Tensor:
        return self.weight

    def as_prefix(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss(self, ids, mask, labels) -> torch.Tensor:
        from transformers import DynamicCache

        B = ids.shape[0]
        L, _, P, _ = self.weight.shape  # [L, 2, P, D]
        g = self.geo
        kv = self.weight.view(1, L, 2, P, g.kv_heads, g.head_dim).transpose(3, 4)  # [1, L, 2, heads, P, hd]
        kv = kv.expand(B, -1, -1, -1, -1, -1)  # [B, L, 2, heads, P, hd]
        cache = DynamicCache([(kv[:, i, 0], kv[:, i, 1]) for i in range(L)])
        m = torch.cat([mask.new_ones(B, P), mask], 1)  # [B, P+T]
        with self.loss_fn.autocast(ids.device):
            out = self.bb.model(input_ids=ids, attention_mask=m, **{self.keyword: cache},
                                **self.loss_fn.kwargs())
        return self.loss_fn(out, mask, labels)

    def step(self, ids, mask, labels) -> torch.Tensor:
        return update(self.loss(ids, mask, labels), [self.weight], self.optimizer, self.loss_fn.max_grad_norm)


# -- checks -------------------------------------------------------------------------------------
def _loss_and_grad(arm, ids, mask, labels, **kw) -> tuple[float, torch.Tensor]:
    p = arm.prompt()
    p.grad = None
    loss = arm.loss(ids, mask, labels, **kw)
    loss.backward()
    g = p.grad.detach().clone()
    p.grad = None
    return loss.item(), g


def check_arms(bb, arms: dict, ids, mask, labels, P: int, bf16: bool = False) -> dict:
    """Same function, same-size work, same number of trainable numbers. Dropout off while checking.

    Under bf16 autocast the arms' kernels round differently (the splice order differs, PEFT's too), so the
    losses and gradients are compared at bf16's resolution: the loss to 2%, the gradient by its relative
    error ||g - g_ref|| / ||g_ref|| <= 0.1 (elementwise closeness fails on bf16's noise in small entries).
    """
    B, T = ids.shape
    H = bb.hidden_size
    for k, arm in arms.items():
        n = sum(p.numel() for p in (arm.optimizer.param_groups[0]["params"]))
        total = sum(p.numel() for g in arm.optimizer.param_groups for p in g["params"])
        assert total == n == P * H, f"({k}) trains {total} numbers, expected P*H = {P * H}"
        assert torch.equal(arm.prompt().detach(), arms["a"].prompt().detach()), f"({k}) starts elsewhere"
    # every arm hands the transformer stack [B, P+T, H] embeddings and a [B, P+T] mask
    seen = {}
    stack = bb.model.base_model  # BertModel itself; LlamaModel inside LlamaForCausalLM

    def hook(_mod, args, kwargs):
        e = kwargs.get("inputs_embeds")
        seen["shape"] = (tuple(e.shape) if e is not None else None, tuple(kwargs["attention_mask"].shape))

    handle = stack.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = bb.model.training
    bb.model.eval()
    try:
        res = {}
        for k, arm in arms.items():
            seen.clear()
            res[k] = _loss_and_grad(arm, ids, mask, labels)
            assert seen.get("shape") == ((B, P + T, H), (B, P + T)), f"({k}) fed {seen.get('shape')}"
        front = _loss_and_grad(arms["c"], ids, mask, labels, after_first=False)  # PEFT's placement
    finally:
        handle.remove()
        bb.model.train(was_training)

    assert _close(bf16, res["a"], res["c"]), f"(a) and (c) disagree: loss {res['a'][0]} vs {res['c'][0]}"
    assert _close(bf16, res["b"], front), f"(b) and (c), prompt in front, disagree: {res['b'][0]} vs {front[0]}"
    return {"loss_a": res["a"][0], "loss_b": res["b"][0], "loss_c": res["c"][0]}


def _close(bf16: bool, x, y) -> bool:
    """Two arms' (loss, gradient) agree: to float rounding in fp32, to bf16's precision under autocast."""
    if bf16:
        rel = ((x[1] - y[1]).norm() / y[1].norm().clamp(min=1e-12)).item()
        return abs(x[0] - y[0]) <= 2e-2 * max(1.0, abs(y[0])) and rel <= 0.1
    same_loss = abs(x[0] - y[0]) <= 1e-4 * max(1.0, abs(y[0]))
    return same_loss and torch.allclose(x[1], y[1], rtol=1e-3, atol=1e-6)


def check_prefix_arms(bb, arms: dict, ids, mask, labels, bf16: bool = False) -> dict:
    """check_arms for --kind prefix, everything compared in (a)'s [L, 2, P, D] layout. Dropout off."""
    B, T = ids.shape
    ref = arms["a"].prompt().detach()
    L, _, P, D = ref.shape
    for k, arm in arms.items():
        total = sum(p.numel() for g in arm.optimizer.param_groups for p in g["params"])
        assert total == L * 2 * P * D, f"({k}) trains {total} numbers, expected L*2*P*D = {L * 2 * P * D}"
        assert torch.equal(arm.as_prefix(arm.prompt().detach()), ref), f"({k}) starts elsewhere"
    # every arm hands the transformer stack a cache of P positions in each of L layers, and a [B, P+T] mask
    seen = {}

    def hook(_mod, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        e = kwargs.get("inputs_embeds")
        x = e if e is not None else kwargs.get("input_ids")
        seen["shape"] = (tuple(x.shape[:2]), tuple(kwargs["attention_mask"].shape),
                         None if cache is None else (len(cache.layers), cache.get_seq_length()))

    handle = bb.model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = bb.model.training
    bb.model.eval()
    try:
        res = {}
        for k, arm in arms.items():
            seen.clear()
            arm.prompt().grad = None
            loss = arm.loss(ids, mask, labels)
            loss.backward()
            res[k] = loss.item(), arm.as_prefix(arm.prompt().grad.detach()).clone()
            arm.prompt().grad = None
            assert seen.get("shape") == ((B, T), (B, P + T), (L, P)), f"({k}) fed {seen.get('shape')}"
    finally:
        handle.remove()
        bb.model.train(was_training)

    assert _close(bf16, res["a"], res["c"]), f"(a) and (c) disagree: loss {res['a'][0]} vs {res['c'][0]}"
    assert _close(bf16, res["b"], res["c"]), f"(b) and (c) disagree: loss {res['b'][0]} vs {res['c'][0]}"
    return {"loss_a": res["a"][0], "loss_b": res["b"][0], "loss_c": res["c"][0]}


def saved_for_backward(arm, network: nn.Module, ids, mask, labels) -> int:
    """Bytes the autograd graph of one step's forward holds for backward: each storage once, the backbone's
    weights (shared by every arm, held anyway) left out. One untimed forward + backward (the pack hook costs
    time); on the CPU the stand-in for the peak memory a step adds."""
    from torch.autograd.graph import saved_tensors_hooks

    weights = {p.untyped_storage().data_ptr() for p in network.parameters()}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and t.device.type != "meta":
            held[st.data_ptr()] = st.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = arm.loss(ids, mask, labels)
    loss.backward()
    arm.optimizer.zero_grad(set_to_none=True)
    return sum(held.values())


# -- timing -------------------------------------------------------------------------------------
def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def bench_model(name: str, args, repeats: int, warmup: int, B: int | None = None) -> dict:
    from composer.backbones import load_backbone

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    bb = load_backbone(name, device=args.device)
    load_s = time.perf_counter() - t0
    dev = bb_device(bb)
    cuda = dev.type == "cuda"
    kind = getattr(args, "kind", "prompt")
    lr = args.lr if args.lr is not None else DEFAULT_LR[kind]
    B, T, P = B or int(args.batch_size), args.seq_len, args.prompt_length
    a = ComposerArm(bb, P, B, lr, steps=warmup + repeats + 10, precision=args.mixed_precision, kind=kind)
    head = a.core.head
    ids, mask, labels = (x.to(dev) for x in fixed_batch(a.prep.train, bb.tokenizer, bb.family, B, T))
    label_ids = label_emb = None
    if head.kind == "verbalizer":
        assert head.single, "the benchmark's decoder loss needs single-token label words"
        label_ids = torch.tensor([t[0] for t in head.label_token_ids], device=dev)
    elif head.kind == "label-similarity":
        with torch.no_grad():
            label_emb = head.label_embeddings(a.core).detach().clone()  # [C, H], encoded once (frozen)
    else:
        raise SystemExit(f"{name}: default head {head.kind} is not benchmarked")
    init = a.prompt().detach().clone()
    loss = Loss(bb.family == "decoder", label_ids, label_emb, a.cfg.label_temperature, a.cfg.max_grad_norm,
                precision=args.mixed_precision)
    bf16 = args.mixed_precision == "bf16"
    if kind == "prefix":
        arms = {"a": a, "b": PeftPrefixArm(bb, P, init, lr, loss), "c": BarePrefixArm(bb, init, lr, loss)}
        checks = check_prefix_arms(bb, arms, ids, mask, labels, bf16=bf16)
    else:
        arms = {"a": a, "b": PeftArm(bb, P, init, lr, loss),
                "c": BareArm(bb, init, lr, loss, after_first=a.core.after_first)}
        checks = check_arms(bb, arms, ids, mask, labels, P, bf16=bf16)

    # train mode for the shared backbone, as train.py's model.train(); --no-dropout: eval mode for all
    a.model.train(not args.no_dropout)
    saved = ({k: saved_for_backward(arm, bb.model, ids, mask, labels) for k, arm in arms.items()}
             if kind == "prefix" else {})
    times = {k: [] for k in ARMS}
    cpu_times = {k: [] for k in ARMS}  # the process's CPU seconds in the step: with --threads 1 on a shared
    # machine, the step's own work, whatever the other processes take of the cores (wall time counts both)
    losses = {k: [] for k in ARMS}
    peak = {k: 0 for k in ARMS}  # bytes, the most any one step of the arm held on the GPU
    for r in range(warmup + repeats):
        # a, b, c, a, b, c, ...: drift hits every arm alike; --kind prefix also rotates who goes first (abc, bca,
        # cab, ...), so that no arm always runs right after the same other one
        order = ARMS[r % 3:] + ARMS[:r % 3] if kind == "prefix" else ARMS
        for k in order:
            arm = arms[k]
            before = arm.prompt().detach().clone()
            gc.collect()
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t, c = time.perf_counter(), time.process_time()
            loss = arm.step(ids, mask, labels)
            if cuda:
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t
            dc = time.process_time() - c
            if cuda:
                peak[k] = max(peak[k], torch.cuda.max_memory_allocated(dev))
            assert not torch.equal(before, arm.prompt().detach()), f"({k}) step {r} left its prompt unchanged"
            losses[k].append(float(loss))
            if r >= warmup:
                times[k].append(dt)
                cpu_times[k].append(dc)
        print(f"  {name} repeat {r + 1}/{warmup + repeats}: " + "  ".join(
            f"{k} {times[k][-1] * 1e3:.1f} ms" if r >= warmup else f"{k} warm-up" for k in ARMS),
            file=sys.stderr, flush=True)

    stats = {}
    for k in ARMS:
        q1, med, q3 = quantiles(times[k])
        stats[k] = {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
                    "times_ms": [x * 1e3 for x in times[k]], "loss_first": losses[k][0],
                    "loss_last": losses[k][-1]}
        if cuda:
            stats[k]["peak_mib"] = peak[k] / 2**20
        if saved:
            stats[k]["saved_mib"] = saved[k] / 2**20
        stats[k]["cpu_median_ms"] = statistics.median(cpu_times[k]) * 1e3
        stats[k]["cpu_times_ms"] = [x * 1e3 for x in cpu_times[k]]
    paired = {f"{x}/{y}": statistics.median(p / q for p, q in zip(times[x], times[y]))
              for x, y in (("a", "b"), ("a", "c"))}
    out = {"model": name, "kind": kind, "family": bb.family, "head": head.kind, "hidden": bb.hidden_size,
           "prompt_shape": list(init.shape), "lr": lr,
           "B": B, "T": T, "P": P, "device": str(dev), "mixed_precision": args.mixed_precision,
           "repeats": repeats, "warmup": warmup, "dropout": not args.no_dropout, "load_s": round(load_s, 1),
           "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before load, after timing
           "checks": checks, "arms": stats,
           "ratio_of_medians": {"a/b": stats["a"]["median_ms"] / stats["b"]["median_ms"],
                                "a/c": stats["a"]["median_ms"] / stats["c"]["median_ms"]},
           "median_paired_ratio": paired}
    out["cpu_ratio_of_medians"] = {x: stats[x[0]]["cpu_median_ms"] / stats[x[2]]["cpu_median_ms"]
                                   for x in ("a/b", "a/c")}
    out["cpu_median_paired_ratio"] = {
        f"{x}/{y}": statistics.median(p / q for p, q in zip(cpu_times[x], cpu_times[y]))
        for x, y in (("a", "b"), ("a", "c"))}
    if saved:
        out["saved_ratio"] = {"a/b": saved["a"] / saved["b"], "a/c": saved["a"] / saved["c"]}
    if cuda:
        out["peak_ratio"] = {"a/b": peak["a"] / peak["b"], "a/c": peak["a"] / peak["c"]}
    if args.profile:
        out["profile"] = profile_arms(arms, ids, mask, labels, args.profile, kind)
    del arms, a
    gc.collect()
    return out


def profile_arms(arms: dict, ids, mask, labels, steps: int, kind: str = "prompt") -> dict:
    """torch.profiler over ``steps`` steps of each arm -> the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for k, arm in arms.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                arm.step(ids, mask, labels)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        names = PREFIX_ARM_NAMES if kind == "prefix" else ARM_NAMES
        print(f"\n== profile ({k}) {names[k]}, {steps} steps ==\n{table}", file=sys.stderr)
        tables[k] = table
    return tables


# -- report -------------------------------------------------------------------------------------
def cpu_model() -> str:
    return machine()["cpu"]


def cpu_isa() -> str:
    """The instruction-set level torch's CPU kernels dispatch to ("AVX512", "AVX2", "DEFAULT", ...): with the
    CPU model, what decides which float kernels run."""
    return machine()["cpu_isa"]


def cpu_label(cpu: str, isa: str | None) -> str:
    """The CPU as a report names it, "Intel(R) Xeon(R) Processor (AVX512)"; the bare model where no level was
    kept."""
    return f"{cpu} ({isa})" if isa else cpu


def bb_device(bb) -> torch.device:
    return next(bb.model.parameters()).device


def environment(threads: int) -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu_model(), "cpu_isa": cpu_isa(),
            "cpu_count": os.cpu_count(),
            "threads": threads, "interop_threads": torch.get_num_interop_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def markdown(results: list[dict], env: dict, command: str) -> str:
    gpu = any(r["device"].startswith("cuda") for r in results)

    def cell(s):
        mem = f"; {s['peak_mib']:.0f} MiB" if "peak_mib" in s else ""
        return f"{s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}){mem}"

    lines = [
        f"`{command}`",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
        f"CPU {cpu_label(env['cpu'], env.get('cpu_isa'))} "
        f"({env['cpu_count']} logical), torch threads {env['threads']}"
        + (f"; GPU {env['gpu']}" if gpu else "")
        + (f"; {results[0]['mixed_precision']} autocast" if results[0]["mixed_precision"] != "no" else "") + ".",
        "Median ms per training step (25th–75th percentile); a/b and a/c are ratios of medians "
        "[median of the per-repeat paired ratios]. Load = 1-minute load average before / after the model's "
        "run "
        "(other processes on the machine compete for the same cores)."
        + (" On the GPU each cell adds the arm's peak memory allocated in a step." if gpu else ""),
        "",
        "| backbone | B × T, P | repeats | (a) prompt-composer | (b) PEFT PromptTuning | (c) bare backbone "
        "| a/b | a/c | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, rom, pr = r["arms"], r["ratio_of_medians"], r["median_paired_ratio"]
        lines.append(
            f"| {r['model']} ({r['head']}) | {r['B']} × {r['T']}, {r['P']} | {r['repeats']} | "
            f"{cell(s['a'])} | "
            f"{cell(s['b'])} | {cell(s['c'])} | {rom['a/b']:.3f} [{pr['a/b']:.3f}] | "
            f"{rom['a/c']:.3f} [{pr['a/c']:.3f}] | {r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} |")
    return "\n".join(lines)


def prefix_markdown(results: list[dict], env: dict, command: str) -> str:
    """The --kind prefix table: ms per step per arm, the ratios, and the memory the script measures."""
    gpu = any(r["device"].startswith("cuda") for r in results)

    def cell(s):
        mem = f"; {s['peak_mib']:.0f} MiB peak" if "peak_mib" in s else ""
        return f"{s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}){mem}"

    precision = results[0]["mixed_precision"]
    lines = [
        f"`{command}`",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
        f"CPU {cpu_label(env['cpu'], env.get('cpu_isa'))} ({env['cpu_count']} logical), "
        f"torch threads {env['threads']}" + (f"; GPU {env['gpu']}" if gpu else "")
        + (f"; {precision} autocast" if precision != "no" else "") + ".",
        ("Median ms per training step (25th–75th percentile); a/b and a/c are ratios of medians "
         "[median of the per-repeat paired ratios]. Saved = MiB the step's autograd graph holds for "
         "backward (backbone weights left out), a/b its ratio. CPU = median process CPU time per step "
         "(ms) and its a/b, a/c: with one torch thread, the step's own work, which other processes on the "
         "machine do not stretch")
        + ("; peak = GPU memory allocated in a step" if gpu else "; peak memory is measured on a GPU only")
        + ". Load = 1-minute load average before / after the model's run.",
        "",
        ("| backbone | prefix [L, 2, P, D] | B × T | repeats | (a) prompt-composer prefix "
         "| (b) PEFT PrefixTuning | (c) bare backbone + cache | a/b | a/c | CPU a / b / c | CPU a/b, a/c "
         "| saved a / b / c (MiB) | saved a/b | load |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, rom, pr = r["arms"], r["ratio_of_medians"], r["median_paired_ratio"]
        L, _, P, D = r["prompt_shape"]
        saved = " / ".join(f"{s[k]['saved_mib']:.1f}" for k in ARMS)
        cpu, cr = " / ".join(f"{s[k]['cpu_median_ms']:.0f}" for k in ARMS), r["cpu_ratio_of_medians"]
        cp = r["cpu_median_paired_ratio"]
        lines.append(
            f"| {r['model']} ({r['head']}) | [{L}, 2, {P}, {D}] | {r['B']} × {r['T']} | {r['repeats']} | "
            f"{cell(s['a'])} | {cell(s['b'])} | {cell(s['c'])} | {rom['a/b']:.3f} [{pr['a/b']:.3f}] | "
            f"{rom['a/c']:.3f} [{pr['a/c']:.3f}] | {cpu} | {cr['a/b']:.3f} [{cp['a/b']:.3f}], "
            f"{cr['a/c']:.3f} [{cp['a/c']:.3f}] | {saved} | {r['saved_ratio']['a/b']:.3f} | "
            f"{r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} |")
    return "\n".join(lines)


def per_model(value: str, models: list[str], flag: str) -> list[int]:
    """'30' -> [30, 30]; '30,20' -> one per model."""
    parts = [int(x) for x in value.split(",")]
    if len(parts) == 1:
        parts *= len(models)
    if len(parts) != len(models) or min(parts) < 0:
        raise SystemExit(f"{flag} {value!r}: give one count, or one per model ({len(models)})")
    return parts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2-135m", help="comma-separated backbone aliases/paths")
    ap.add_argument("--batch-size", default="16", help="B: one count, or one per model: 16,8")
    ap.add_argument("--kind", choices=("prompt", "prefix"), default="prompt",
                    help="prompt: an input-level prompt vs PEFT PromptTuning; prefix: vs PEFT PrefixTuning")
    ap.add_argument("--seq-len", type=int, default=64, help="T, input tokens per row (no padding)")
    ap.add_argument("--prompt-length", type=int, default=20, help="P, prompt tokens")
    ap.add_argument("--repeats", default="30", help="timed steps per arm: one count, or one per model: 30,20")
    ap.add_argument("--warmup", default="5", help="untimed steps per arm first: one count, or one per model")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--lr", type=float, default=None,
                    help="prompt learning rate (all arms; default 0.3 for --kind prompt, 0.01 for prefix)")
    ap.add_argument("--no-dropout", action="store_true", help="time the backbone in eval mode (all arms)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, run torch.profiler over STEPS steps of each arm (tables on stderr)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    ap.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                    help="bf16 autocast in every arm (GPU)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    models = [m for m in args.models.split(",") if m]
    repeats = per_model(args.repeats, models, "--repeats")
    warmups = per_model(args.warmup, models, "--warmup")
    batches = per_model(args.batch_size, models, "--batch-size")
    if min(batches) < 1:
        raise SystemExit(f"--batch-size {args.batch_size!r}: each B must be at least 1")
    if min(repeats) < 2:
        raise SystemExit("--repeats must be at least 2 (the IQR needs two points)")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = environment(threads)
    command = "python bench/step_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    for name, n, w, B in zip(models, repeats, warmups, batches):
        print(f"{name}: {w} warm-up + {n} timed steps per arm", file=sys.stderr, flush=True)
        results.append(bench_model(name, args, n, w, B))
    table = (prefix_markdown if args.kind == "prefix" else markdown)(results, env, command)
    print(table)
    if args.out:
        doc = {"command": command, "kind": args.kind, "env": env, "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
