"""Multitask prompt tuning (MPT; Wang et al., ICLR 2023): one shared prompt, and per task a rank-1 multiplier.

    P_k = P* ∘ (u_k v_kᵀ)        P* [P, H] shared, u_k [P], v_k [H] task k's; ∘ elementwise

Two stages, as in the paper:
1. source training (``train --multitask --shared mpt``, composer/multitask.py): the single-task prompts of
   the source tasks (teachers, from the library) are distilled into the decomposition (student). The loss of a
   row of task k is its task loss + ``distill_kl`` * KL(teacher || student) of the label (or, for a generation
   row, each target token's) distribution + ``distill_hidden`` * the MSE of the last hidden states. The run
   saves one entry holding P* (as prompt_embeddings) and every task's factors (mpt.safetensors: u [K, N, r],
   v [K, r, W]), and with --save-prefix each task's materialised P_k as a plain entry.
2. target adaptation (``train TARGET --init library:NAME``): the target's prompt is P* ∘ (u vᵀ), and P*, u
   and v all train (``target_source``). u, v start at ones (the target starts at P*), or with
   ``library:NAME@TASK`` at source TASK's factors, ``@mean`` at the sources' mean (PEFT's
   AVERAGE_SOURCE_TASKS), ``@similar`` at those of the source with the heaviest ``similar`` edge into the
   target in the graph the entry was trained on.

The math (``mpt_prompts``) is pure: per-row task ids [B] -> per-row prompts [B, P, H], for a prompt [P, H] and a
prefix [L, 2, P, D] alike: a prefix is a stack of N = L*2*P per-layer prompt rows of width D (composer/prefix.py),
so u_k has one entry per row, v_k one per width. Rank r > 1 (PEFT's num_ranks) is the same code with
u [K, N, r], v [K, r, W]; the paper's and the default rank is 1.

Departures from PEFT's MultitaskPromptEmbedding (same layout: its prefix_task_cols is our u, prefix_task_rows
our v): PEFT starts u and v at N(0, 0.02), which starts every task prompt near zero, P* ∘ (u vᵀ) ≈ 0; we start
them at ones and P* at the teachers' mean, so each task starts at a prompt of the teachers' scale. PEFT ships
no distillation stage, and needs task_ids in every call, generate included; here each task's view (and
each saved P_k) is an ordinary prompted model, a mixed batch carries its own task ids (composer/multitask.py's
batches; ``generate_mixed`` for decoding one), and the user never passes them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composer.errors import ComposerError, LibraryError, TrainingError
from composer import graph as G_
from composer.model import MultiTaskModel, PromptedModel, build_model, trained_label_temperature
from composer.prefix import geometry

log = logging.getLogger(__name__)

__all__ = ["mpt_prompts", "check_factors", "MPTPrompt", "MPTTaskSource", "MPTModel", "distill_terms",
           "target_source", "is_mpt", "generate_mixed", "MPT_EXTRA"]

MPT_EXTRA = "mpt"
"""The library extra (NAME/mpt.safetensors) that makes an entry an MPT one: keys "u" and "v"."""


# -- the math ---------------------------------------------------------------------------------------
def check_factors(shared: Tensor, u: Tensor, v: Tensor) -> None:
    """shared [P, H] or [L, 2, P, D]; u [K, N, r], v [K, r, W] with N the rows and W the width of ``shared``."""
    if shared.dim() not in (2, 4):
        raise ComposerError(f"a shared prompt is [P, H] or a prefix [L, 2, P, D], got shape {tuple(shared.shape)}")
    W = shared.shape[-1]
    N = shared.numel() // W
    if u.dim() != 3 or v.dim() != 3 or u.shape[0] != v.shape[0] or u.shape[2] != v.shape[1]:
        raise ComposerError(f"MPT factors are u [K, N, r] and v [K, r, W], got {tuple(u.shape)} and {tuple(v.shape)}")
    if u.shape[1] != N or v.shape[2] != W:
        raise ComposerError(f"MPT factors u {tuple(u.shape)}, v {tuple(v.shape)} do not fit a shared prompt of "
                            f"shape {tuple(shared.shape)} (u needs {N} rows, v width {W})")


def mpt_prompts(shared: Tensor, u: Tensor, v: Tensor, task_ids: Tensor) -> Tensor:
    """Each row's prompt P_k = P* ∘ (u_k v_k).

    shared [P, H] (or a prefix [L, 2, P, D], as its N = L*2*P rows of width D), u [K, N, r], v [K, r, W],
    task_ids [B] (positions in K) -> [B, P, H] (or [B, L, 2, P, D]).
    """
    check_factors(shared, u, v)
    if task_ids.dim() != 1:
        raise ComposerError(f"task ids are one per row, [B], got shape {tuple(task_ids.shape)}")
    K = u.shape[0]
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= K):
        raise ComposerError(f"task ids must be in [0, {K}) (this shared prompt holds {K} tasks), got "
                            f"{sorted(set(task_ids.tolist()))}")
    W = shared.shape[-1]
    rows = shared.reshape(-1, W)  # [N, W]
    scale = torch.bmm(u[task_ids], v[task_ids])  # [B, N, r] @ [B, r, W] -> [B, N, W]
    return (rows * scale).reshape(len(task_ids), *shared.shape)


# -- as prompt sources ------------------------------------------------------------------------------
class MPTPrompt(nn.Module):
    """P* and K tasks' factors, all trainable: ``shared`` [P, H] or [L, 2, P, D], ``u`` [K, N, r], ``v`` [K, r, W].

    forward(task_ids [B]) -> [B, P, H] (``mpt_prompts``). u and v start at ones unless given: every task starts
    at P* itself."""

    def __init__(self, shared: Tensor, num_tasks: int = 1, u: Tensor | None = None, v: Tensor | None = None,
                 rank: int = 1):
        super().__init__()
        shared = shared.detach().float()
        W = shared.shape[-1]
        N = shared.numel() // W
        u = torch.ones(num_tasks, N, rank) if u is None else u.detach().float()
        v = torch.ones(num_tasks, rank, W) if v is None else v.detach().float()
        check_factors(shared, u, v)
        self.shared = nn.Parameter(shared.contiguous().clone())
        self.u = nn.Parameter(u.contiguous().clone())
        self.v = nn.Parameter(v.contiguous().clone())

    @property
    def kind(self) -> str:
        return "prefix" if self.shared.dim() == 4 else "prompt"

    @property
    def num_tasks(self) -> int:
        return self.u.shape[0]

    def forward(self, task_ids: Tensor) -> Tensor:
        return mpt_prompts(self.shared, self.u, self.v, task_ids)

    def task_prompt(self, k: int) -> Tensor:
        """P_k alone: [P, H] (or [L, 2, P, D])."""
        return mpt_prompts(self.shared, self.u, self.v, torch.tensor([k], device=self.u.device))[0]


class MPTTaskSource(nn.Module):
    """Task ``index`` of an MPTPrompt as a prompt source: forward(embeds [B, T, H], mask) -> [B, P, H] (or
    [B, L, 2, P, D]). Every task's source holds the same MPTPrompt (its parameters are counted once)."""

    def __init__(self, mpt: MPTPrompt, index: int):
        super().__init__()
        if not 0 <= index < mpt.num_tasks:
            raise ComposerError(f"task index {index} is not in this shared prompt's {mpt.num_tasks} tasks")
        self.mpt = mpt
        self.index = int(index)

    @property
    def kind(self) -> str:
        return self.mpt.kind

    @property
    def length(self) -> int:
        return self.mpt.shared.shape[-2]

    def forward(self, embeds: Tensor, mask: Tensor | None = None) -> Tensor:
        p = self.mpt.task_prompt(self.index)  # computed once per batch, the same for every row
        return p.unsqueeze(0).expand(embeds.shape[0], *p.shape)

    def static(self) -> Tensor:
        """P_k materialised: what a task's library entry holds."""
        return self.mpt.task_prompt(self.index).detach()


# -- distillation -----------------------------------------------------------------------------------
class _TapView(PromptedModel):
    """A task's view that, while ``tap`` is a dict, records what distillation reads of its forward: the inputs,
    the output (label logits [B, C] or target NLL [B]), the first hidden-state pass (the prompted input's: every
    head runs it first) and, for a generation row, the token logits [B, m, V]."""

    tap: dict | None = None

    def forward(self, input_ids, attention_mask, prompt=None, targets=None):
        if self.tap is None:
            return super().forward(input_ids, attention_mask, prompt, targets)
        self.tap.update(ids=input_ids, mask=attention_mask, targets=targets)
        hook = None
        if targets is not None:
            def keep(_m, _inp, out):
                self.tap.setdefault("token_logits", out)
            hook = self.network.get_output_embeddings().register_forward_hook(keep)
        try:
            out = super().forward(input_ids, attention_mask, prompt, targets)
        finally:
            if hook is not None:
                hook.remove()
        self.tap["out"] = out
        return out

    def hidden(self, embeds, mask):
        h = super().hidden(embeds, mask)
        if self.tap is not None and "hidden" not in self.tap:
            self.tap["hidden"] = (h, mask)
        return h


def _kl_rows(teacher: Tensor, student: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last dim: [..., C] -> [...]."""
    t = F.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - F.log_softmax(student.float(), -1))).sum(-1)


def distill_terms(student: dict, teacher: dict, rows: int) -> tuple[Tensor, Tensor]:
    """(KL [B_i], hidden MSE [B_i]) per row of one task's group from two taps (``_TapView``)."""
    if student.get("targets") is not None:  # a generation row: each target token's distribution
        valid = (student["targets"] >= 0).float()  # [B_i, m]
        kl = (_kl_rows(teacher["token_logits"], student["token_logits"]) * valid).sum(1) / valid.sum(1)
    else:
        kl = _kl_rows(teacher["out"], student["out"])  # [B_i]
    (hs, m), (ht, _) = student["hidden"], teacher["hidden"]  # [R, T, H], mask [R, T]; R = B_i or B_i * C
    if hs.shape != ht.shape:
        raise TrainingError(f"student and teacher hidden states differ in shape ({tuple(hs.shape)} vs "
                            f"{tuple(ht.shape)}): their prompts must have one length")
    m = m[:, -hs.shape[1]:].float()
    mse = (((hs.float() - ht.float()) ** 2).mean(-1) * m).sum(1) / m.sum(1).clamp(min=1)  # [R]
    return kl, mse.view(rows, -1).mean(1)


class MPTModel(MultiTaskModel):
    """A MultiTaskModel whose task prompts are an MPTPrompt's (``shared``), trained by distillation.

    forward is MultiTaskModel's; given labels, while the model trains and a weight is positive, each row's loss
    also gets ``kl`` * KL + ``hidden`` * MSE against its task's teacher (a frozen prompt and head on the same
    backbone, run without dropout and without gradients). The teachers are registered (they move with the
    model) but never train, so they are in no checkpoint and no optimizer."""

    def __init__(self, backbone, mpt: MPTPrompt, sources: dict, heads: dict, num_labels: dict,
                 teachers: dict[str, PromptedModel] | None = None, kl: float = 1.0, hidden: float = 1.0):
        super().__init__(backbone, sources, heads, num_labels, shared=mpt)
        self._views = {t: _TapView(backbone, self.prompts[t], self.heads[t]) for t in self.tasks}
        teachers = teachers or {}
        self.teacher_prompts = nn.ModuleDict({t: pm.prompt_source for t, pm in teachers.items()})
        self.teacher_heads = nn.ModuleDict({t: pm.head for t, pm in teachers.items()})
        for p in [*self.teacher_prompts.parameters(), *self.teacher_heads.parameters()]:
            p.requires_grad_(False)
        self._teachers = {t: _TapView(backbone, self.teacher_prompts[t], self.teacher_heads[t]) for t in teachers}
        self.kl, self.hidden_weight = float(kl), float(hidden)
        self.last_distill: dict[str, float] = {}
        """The batch's mean KL and MSE (the last training forward's), for the log."""

    @property
    def distilling(self) -> bool:
        return bool(self._teachers) and (self.kl > 0 or self.hidden_weight > 0)

    def forward(self, input_ids, attention_mask, task_ids, labels=None, targets=None):
        if labels is None or not (self.training and self.distilling and torch.is_grad_enabled()):
            return super().forward(input_ids, attention_mask, task_ids, labels, targets)
        present = [self.tasks[i] for i in torch.unique(task_ids).tolist()]
        for t in present:
            self._views[t].tap = {}
        try:
            per_row = super().forward(input_ids, attention_mask, task_ids, labels, targets)  # [B]
            taps = {t: self._views[t].tap for t in present}
        finally:
            for t in present:
                self._views[t].tap = None
        extra = torch.zeros_like(per_row)
        kls, mses = [], []
        for t in present:
            rows = (task_ids == self.tasks.index(t)).nonzero(as_tuple=True)[0]
            s, teacher = taps[t], self._teachers[t]
            teacher.tap = {}
            try:
                with torch.no_grad(), _eval(self.network):
                    teacher(s["ids"], s["mask"], targets=s["targets"])
                kl, mse = distill_terms(s, teacher.tap, len(rows))
            finally:
                teacher.tap = None
            extra[rows] = self.kl * kl + self.hidden_weight * mse
            kls.append(kl.detach())
            mses.append(mse.detach())
        self.last_distill = {"kl": round(torch.cat(kls).mean().item(), 6), "mse": round(torch.cat(mses).mean().item(), 6)}
        return per_row + extra


@contextlib.contextmanager
def _eval(network: nn.Module):
    was = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was)


# -- stage 1: setting up the student and its teachers -----------------------------------------------------
@dataclass
class MPTSetup:
    mpt: MPTPrompt
    keys: list[str]
    teachers: dict[str, str]
    """task key -> the library name of its teacher prompt (empty without distillation)."""
    teacher_entries: dict

    def source(self, key: str) -> MPTTaskSource:
        return MPTTaskSource(self.mpt, self.keys.index(key))

    def provenance(self, key: str) -> dict:
        return {"init": "mpt", "shared": "mpt", "teacher": self.teachers.get(key), "mpt_tasks": self.keys}


def teacher_name(library, key: str, graph_prompt: str | None) -> str | None:
    """A task's teacher: its graph node's prompt, else the library entry named like the task (multitask
    --init library's rule); None when neither is in the library."""
    for name in (graph_prompt, key):
        if name and library.exists(name):
            return name
    return None


def setup_mpt(cfg, found: list, backbone, library, entry_of) -> MPTSetup:
    """Find every task's teacher, check they fit one shared prompt, and build P* (the teachers' mean) with
    factors at ones. ``entry_of(name, what)`` loads a library entry checked against the run's backbone."""
    from composer.prompts import init_prompt  # prompts imports this module (MPT inits): not at the top, or a circle

    keys = [k for k, _, _ in found]
    distill = cfg.distill_kl > 0 or cfg.distill_hidden > 0
    names = {k: teacher_name(library, k, gp) for k, _, gp in found}
    missing = [k for k in keys if names[k] is None]
    if distill and missing:
        k = missing[0]
        gp = next(gp for kk, _, gp in found if kk == k)
        raise TrainingError(f"--shared mpt distils each task's own prompt, and task {k!r} has none: no "
                            f"{'prompt ' + repr(gp) + ' or ' if gp else ''}entry {k!r} in the library at "
                            f"{library.root}; train it first (`prompt-composer train {k} --save {k}`) or give "
                            "distill_kl = distill_hidden = 0")
    teachers = {k: n for k, n in names.items() if n is not None} if distill else {}
    # one backbone, one length, one kind: the decomposition shares a single P*
    trained = {k: library.meta(n).get("backbone") for k, n in teachers.items()}
    first = next(iter(trained), None)
    other = next((k for k in trained if trained[k] != trained[first]), None)
    if other is not None:
        raise TrainingError(f"--shared mpt: the teachers come from different backbones ('{teachers[first]}' on "
                            f"'{trained[first]}', '{teachers[other]}' on '{trained[other]}'); one shared prompt "
                            "needs teachers trained on one backbone")
    entries = {k: entry_of(n, f"--shared mpt teacher of task {k!r}") for k, n in teachers.items()}
    for k, e in entries.items():
        if e.extra("backbone"):
            raise TrainingError(f"--shared mpt: teacher '{teachers[k]}' was tuned jointly (it holds backbone weights); "
                                "MPT distils prompts on one frozen backbone: give a prompt-tuned teacher")
        if e.extra("composer") or e.extra(MPT_EXTRA):
            raise TrainingError(f"--shared mpt: teacher '{teachers[k]}' is a composed module, not one task's "
                                "prompt; give each task's single-task prompt")
    tensors = {}
    for i, k in enumerate(teachers):
        t, _ = init_prompt(f"library:{teachers[k]}", cfg.prompt_length, backbone, None, cfg.seed + i, library,
                           kind=cfg.kind)
        tensors[k] = t
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        a = next(iter(shapes))
        b = next(k for k in shapes if shapes[k] != shapes[a])
        la, lb = shapes[a][-2], shapes[b][-2]
        raise TrainingError(f"--shared mpt: the teachers differ in shape ('{teachers[a]}' {list(shapes[a])}"
                            f"{f', {la} tokens' if la != lb else ''}; '{teachers[b]}' {list(shapes[b])}"
                            f"{f', {lb} tokens' if la != lb else ''}); one shared prompt needs teachers of "
                            "one length (retrain them with one --prompt-length)")
    if tensors:
        shared = torch.stack(list(tensors.values())).mean(0)  # P* starts at the teachers' mean
    else:
        shared, _ = init_prompt(cfg.init, cfg.prompt_length, backbone, None, cfg.seed, library, kind=cfg.kind)
        if isinstance(shared, nn.Module):
            raise TrainingError(f"--shared mpt: --init {cfg.init} is a composed module; start P* from a prompt")
    return MPTSetup(MPTPrompt(shared, len(keys)), keys, teachers, {k: (entries[k], tensors[k]) for k in teachers})


def build_mpt_model(backbone, setup: MPTSetup, views: dict, specs: dict, cfg) -> MPTModel:
    """The MPTModel over the task views (their heads) and each task's teacher: its prompt, with the head it
    was trained with (a linear head's weights from its entry; the student's linear head starts there too)."""
    teachers = {}
    for k, (entry, tensor) in setup.teacher_entries.items():
        same_task = entry.meta.get("task") == specs[k].name
        head = cfg.head or (entry.meta.get("head") if same_task else None)
        tv = build_model(backbone, specs[k], tensor, head=head,
                         label_temperature=trained_label_temperature(entry.meta, cfg.label_temperature))
        state = entry.extra("head")
        if state and same_task and tv.head.kind == "linear":
            proj = {n.split(".", 1)[1]: w for n, w in state.items()}
            tv.head.proj.load_state_dict(proj)
            if views[k].head.kind == "linear" and views[k].head.proj.weight.shape == tv.head.proj.weight.shape:
                views[k].head.proj.load_state_dict(proj)
        teachers[k] = tv
    return MPTModel(backbone, setup.mpt, {k: v.prompt_source for k, v in views.items()},
                    {k: v.head for k, v in views.items()}, {k: specs[k].num_labels for k in views},
                    teachers=teachers, kl=cfg.distill_kl, hidden=cfg.distill_hidden)


def save_mpt_entry(library, name: str, model: MPTModel, backbone, cfg, setup: MPTSetup, metrics: dict) -> None:
    """The shared prompt P* (prompt_embeddings) and every task's factors (mpt.safetensors), with provenance."""
    mpt = model.shared
    meta = {"task": None, "backbone": backbone.name, "family": backbone.family, "hidden_size": backbone.hidden_size,
            "kind": mpt.kind, "head": None, "metrics": metrics, "config": cfg.to_dict(),
            "provenance": {"shared": "mpt", "tasks": setup.keys, "teachers": setup.teachers, "graph": cfg.graph,
                           "weights": {"kl": cfg.distill_kl, "hidden": cfg.distill_hidden},
                           "rank": mpt.u.shape[2], "multitask": setup.keys,
                           "temperature": cfg.sampling_temperature}}
    if mpt.kind == "prefix":
        meta["prefix_heads"] = geometry(backbone.network, backbone.family).kv_heads
    library.save(name, mpt.shared, meta, extras={MPT_EXTRA: {"u": mpt.u, "v": mpt.v}})


# -- stage 2: a target from an MPT entry ------------------------------------------------------------------
def is_mpt(entry) -> bool:
    return (entry.meta.get("provenance") or {}).get("shared") == "mpt" and entry.extra(MPT_EXTRA) is not None


def _similar_source(entry, tasks: list[str], target: str | None) -> str:
    """The entry's source task with the heaviest similar edge into ``target`` in the graph it was trained on."""
    prov = entry.meta.get("provenance") or {}
    if not prov.get("graph"):
        raise LibraryError(f"library:{entry.name}@similar follows the graph's similar edges, and '{entry.name}' "
                           "was trained from a task list, not a graph; pick a task with @TASK "
                           f"({', '.join(tasks)})")
    if target is None:
        raise LibraryError(f"library:{entry.name}@similar needs the target task; pick a task with @TASK")
    G = G_.load_graph(prov["graph"])
    node = target if target in G else next((n for n, d in G.nodes(data=True) if d.get("task") == target), None)
    ranked = [(s, w) for s, w in G_.sources(G, node)] if node is not None else []
    ranked = [(s, w) for s, w in ranked if s in tasks]
    if not ranked:
        raise LibraryError(f"library:{entry.name}@similar: graph '{prov['graph']}' has no similar edge into "
                           f"'{target}' from the entry's tasks ({', '.join(tasks)}); add them with `prompt-composer "
                           f"graph link` or pick a task with @TASK")
    log.info("MPT target '%s' starts from the factors of '%s' (similarity %s)", target, *ranked[0])
    return ranked[0][0]


def target_source(entry, pick: str, kind: str, target: str | None = None) -> tuple[MPTTaskSource, dict]:
    """An MPT entry as a target's prompt source: P* and one task's factors, all trainable.

    ``pick``: "" (u, v at ones: the target starts at P*) | a source task's name (its factors) | "mean" (the
    sources' mean factors) | "similar" (the source with the heaviest similar edge into ``target``)."""
    tasks = list((entry.meta.get("provenance") or {}).get("tasks") or [])
    tensors = entry.extra(MPT_EXTRA)
    u, v = tensors.get("u"), tensors.get("v")
    if u is None or v is None or u.shape[0] != len(tasks):
        raise LibraryError(f"prompt '{entry.name}': {MPT_EXTRA}.safetensors must hold u and v for its "
                           f"{len(tasks)} tasks (keys: {sorted(tensors)}); retrain it")
    if entry.meta.get("kind", "prompt") != kind:
        raise ComposerError(f"--init library:{entry.name} is an MPT {entry.meta.get('kind', 'prompt')}, and this "
                            f"run trains a {kind}: train it with --kind {entry.meta.get('kind', 'prompt')}")
    try:
        check_factors(entry.prompt, u, v)
    except ComposerError as e:
        raise LibraryError(f"prompt '{entry.name}': {e}") from None
    if pick == "similar":
        pick_task = _similar_source(entry, tasks, target)
    else:
        pick_task = pick
    if pick_task in ("", None):
        uk, vk, factors = None, None, "ones"
    elif pick_task == "mean":
        uk, vk, factors = u.mean(0, keepdim=True), v.mean(0, keepdim=True), "mean"
    elif pick_task in tasks:
        i = tasks.index(pick_task)
        uk, vk, factors = u[i : i + 1], v[i : i + 1], pick_task
    else:
        raise LibraryError(f"--init library:{entry.name}@{pick_task}: task '{pick_task}' is not in that shared "
                           f"prompt (it holds {', '.join(tasks)}); pick one of them, @mean, @similar, or none")
    mpt = MPTPrompt(entry.prompt, 1, uk, vk, rank=u.shape[2])
    prov = {"init": "library", "from": entry.name, "shared": "mpt", "factors": factors}
    return MPTTaskSource(mpt, 0), prov


# -- generation over a mixed batch --------------------------------------------------------------------
@torch.no_grad()
def generate_mixed(model: MultiTaskModel, input_ids: Tensor, attention_mask: Tensor, task_ids: Tensor,
                   pad_id: int = 0, **kw) -> Tensor:
    """Decode a batch whose rows belong to different tasks: each task's rows with its own prompt (P_k for an
    MPT model) -> new tokens [B, N], rows shorter than N filled with ``pad_id``. ``task_ids`` [B] are what the
    batch carries (composer/multitask.py's batches): nothing to pass by hand per call of the model."""
    outs, order = [], []
    for i in torch.unique(task_ids).tolist():
        rows = (task_ids == i).nonzero(as_tuple=True)[0]
        outs.append(model.view(model.tasks[i]).generate(input_ids[rows], attention_mask[rows], **kw))
        order.append(rows)
    N = max(o.shape[1] for o in outs)
    out = input_ids.new_full((len(task_ids), N), pad_id)
    for rows, o in zip(order, outs):
        out[rows, : o.shape[1]] = o
    return out

