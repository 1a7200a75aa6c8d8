"""A frozen (or partly trainable) backbone with a soft prompt in front and a scoring head on top.

PromptedModel.forward(input_ids [B, T], attention_mask [B, T]) -> logits [B, C] over a task's labels.
The prompt comes from ``prompt_source(embeds, mask) -> [B, P, H]``: a plain SoftPrompt or a composer
that mixes prompts per example. The head decides how labels are scored (see composer/heads.py).
MultiTaskModel holds the backbone once and one PromptedModel view per task (composer/multitask.py).

Names: ``backbone`` is the Backbone (composer/backbones.py: network, tokenizer, family, name);
``network`` is its nn.Module, registered here so .to(device) and state_dict see it.

    build_model(backbone, spec, prompt)     a PromptedModel for one task (its head chosen and built)
    from_library(entry, backbone, spec)     the same from a library entry (its head, backbone delta)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from composer.attention import load_source
from composer.backbones import Backbone
from composer.errors import ComposerError, LibraryError, TrainingError
from composer.generation import decode, target_nll
from composer.heads import make_head, resolve_head
from composer.library import check_compatible, prompt_position
from composer.lora import load_lora
from composer.prefix import PrefixPrompt, cache_keyword, check_reaches, is_prefix, prefix_cache
from composer.prefix import geometry as prefix_geometry
from composer.prompts import SoftPrompt, prepend


def set_activation_checkpointing(backbone: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, non-reentrant, on any transformers 4.46+.

    Non-reentrant so that gradients also reach keyword inputs (the prompt, T5's encoder states).
    transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
    """
    if hasattr(backbone, "activation_checkpointing_enable"):
        if on:
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.activation_checkpointing_disable()
    elif on:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_disable()


def attention_kernels(device: torch.device | str):
    """A context that keeps scaled-dot-product attention off cuDNN's kernel on CUDA (a no-op elsewhere).

    Our batches are padded to their longest row, so sequence lengths change from batch to batch, and cuDNN's
    attention builds a new plan for every length it meets: 100 bf16 training steps of a minilm-shaped model
    on an H100 took 19.9 s with it and 2.2 s without (flash, memory-efficient and math kernels stay allowed;
    fp32 never reaches cuDNN's kernel). Used around every forward of PromptedModel and every backward of
    the training loops: a backward (an activation-checkpointing recompute too) must choose as its forward did.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class PromptedModel(nn.Module):
    """A backbone with a prompt source and a head. The prompt source gives either input-level prompts
    [B, P, H] (prepended to the input embeddings) or prefixes [B, L, 2, P, D] (prepended to every attention
    layer's keys and values through the backbone's cache; composer/prefix.py)."""

    def __init__(self, backbone: Backbone, prompt_source: nn.Module, head: nn.Module, position: str = "after-cls"):
        super().__init__()
        self.position = position  # after-cls | front: where a prompt goes on a BERT-style encoder
        self.backbone = backbone
        self.network = backbone.model  # registered, so .to(device) and state_dict see it
        self.prompt_source = prompt_source
        self.head = head
        self._prefix: torch.Tensor | None = None  # the prefix of the forward under way: [B, L, 2, P, D]
        self._geometry = None

    # -- the backbone pieces the heads need -------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are (inputs go there)."""
        return next(self.network.parameters()).device

    @property
    def family(self) -> str:
        return self.backbone.family

    @property
    def kind(self) -> str:
        """prompt | prefix: what the prompt source gives."""
        return getattr(self.prompt_source, "kind", "prompt")

    @property
    def geometry(self):
        if self._geometry is None:
            self._geometry = prefix_geometry(self.network, self.family)
        return self._geometry

    @property
    def after_first(self) -> bool:
        """BERT-style encoders keep [CLS] in front of the prompt, unless the prompt goes in front (PEFT's)."""
        tok = self.backbone.tokenizer
        return self.position == "after-cls" and self.family == "encoder" and tok.cls_token_id is not None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, H] word embeddings (positions are added inside the backbone)."""
        return self.network.get_input_embeddings()(input_ids)

    def prompted(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """-> (embeds [B, P+T, H], mask [B, P+T], P, None) for a prompt, or (embeds [B, T, H], mask [B, T],
        0, prefix [B, L, 2, P, D]) for a prefix (which the backbone's attention reads; see ``using_prefix``)."""
        embeds = self.embed(input_ids)
        if prompt is None:
            prompt = self.prompt_source(embeds, attention_mask)  # [B, P, H] or [B, L, 2, P, D]
        if is_prefix(prompt):
            B = embeds.shape[0]
            prefix = prompt if prompt.dim() == 5 else prompt.unsqueeze(0).expand(B, *prompt.shape)
            return embeds, attention_mask, 0, prefix.to(embeds.dtype)
        out, mask = prepend(embeds, attention_mask, prompt, after_first=self.after_first)
        return out, mask, prompt.shape[-2], None

    @contextlib.contextmanager
    def using_prefix(self, prefix: torch.Tensor | None):
        """Every backbone pass inside the block reads ``prefix`` [B, L, 2, P, D] (None: no prefix)."""
        old, self._prefix = self._prefix, prefix
        try:
            yield
        finally:
            self._prefix = old

    def _with_prefix(self, rows: int, mask: torch.Tensor | None):
        """The prefix for a pass over ``rows`` rows (each example's prefix repeated when the head runs several
        rows per example) -> (cache keyword arguments, the mask with P ones in front)."""
        pre = self._prefix
        if pre is None:
            return {}, mask
        if rows != pre.shape[0]:
            if rows % pre.shape[0]:
                raise ComposerError(f"a pass over {rows} rows cannot take a prefix for {pre.shape[0]} examples")
            pre = pre.repeat_interleave(rows // pre.shape[0], 0)
        kw = {cache_keyword(self.network): prefix_cache(pre, self.geometry, self.family)}
        if mask is not None:
            mask = torch.cat([mask.new_ones(rows, pre.shape[3]), mask], 1)
        return kw, mask

    def run_network(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states [B, T, H] of ``embeds`` with an explicit prefix (None: none)."""
        with self.using_prefix(prefix):
            return self.hidden(embeds, mask)

    def hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the encoder side (or the decoder stack): [B, T, H]."""
        if self.family == "encoder-decoder":
            if self._prefix is not None:
                raise ComposerError("a prefix on an encoder-decoder reaches its decoder, and this head reads the "
                                    "encoder: use --head verbalizer (or --kind prompt)")
            return self.network.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        kw, mask = self._with_prefix(embeds.shape[0], mask)
        # base_model: the stack under the LM head (decoders, encoders loaded with their masked-LM head); a bare
        # encoder is its own base model
        return self.network.base_model(inputs_embeds=embeds, attention_mask=mask, **kw).last_hidden_state

    def decoder_prefix(self, rows: int) -> dict:
        """Keyword arguments that put the prefix in an encoder-decoder's decoder (empty without a prefix)."""
        kw, _ = self._with_prefix(rows, None)
        return kw

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits [B, C] over the task's labels, or with ``targets`` [B, m] (a generation task's target
        tokens, -100 padded) each row's mean target NLL [B]. One forward for both, so DDP sees every call."""
        with attention_kernels(input_ids.device):
            embeds, mask, P, prefix = self.prompted(input_ids, attention_mask, prompt)
            with self.using_prefix(prefix):
                if targets is not None:
                    return target_nll(self, embeds, mask, targets)
                return self.head(self, embeds, mask, P)

    # -- generation -------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 20,
                 use_cache: bool = True, prompt: torch.Tensor | None = None, num_beams: int = 1,
                 stop: list[str] | None = None) -> torch.Tensor:
        """New tokens [B, N] with the prompt (or prefix) in front (composer/generation.py).

        The prompt is part of the context at every step whether the cache is on or off (the
        PEFT pitfall: a cache-less loop that re-feeds only token ids silently drops it).
        """
        with attention_kernels(input_ids.device):
            return decode(self, input_ids, attention_mask, max_new_tokens, num_beams, use_cache, prompt, stop)


class MultiTaskModel(nn.Module):
    """The backbone once, and per task a prompt source and a head.

    forward(input_ids [B, T], attention_mask [B, T], task_ids [B]) -> logits [B, C] with C the largest
    label count; a row's columns past its own task's label count are -inf (so softmax and cross-entropy
    ignore them). ``task_ids`` are positions in ``self.tasks``. Each task's rows run through the backbone
    together, with that task's prompt and head (so prompts of different lengths mix in one batch).
    """

    def __init__(self, backbone: Backbone, sources: dict[str, nn.Module], heads: dict[str, nn.Module],
                 num_labels: dict[str, int], shared: nn.Module | None = None):
        super().__init__()
        bad = [t for t in sources if "." in t or not t]
        if bad:
            raise TrainingError(f"task name {bad[0]!r} cannot name a module (no dots): rename the graph node")
        self.backbone = backbone
        self.network = backbone.model
        if shared is not None:  # registered before the prompts: its parameters are named shared.*
            self.shared = shared
        self.prompts = nn.ModuleDict(sources)
        self.heads = nn.ModuleDict(heads)
        self.tasks = list(sources)
        self.num_labels = dict(num_labels)
        # one PromptedModel per task over the modules above (a plain dict: not registered twice)
        self._views = {t: PromptedModel(backbone, self.prompts[t], self.heads[t]) for t in self.tasks}

    def view(self, task: str) -> PromptedModel:
        """Task ``task`` as a single-task PromptedModel (shares every module with this model)."""
        return self._views[task]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor,
                labels: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits [B, C]; or, given ``labels`` [B] (and ``targets`` [B, m] for generation tasks' rows),
        each row's loss [B]: cross-entropy for a classification row, the target's mean NLL for a generation
        row. One forward for both, so DDP sees every call."""
        C = max(self.num_labels.values())
        rows_all, out_all = [], []
        for i in torch.unique(task_ids).tolist():
            rows = (task_ids == i).nonzero(as_tuple=True)[0]  # [B_i]
            ids, mask = input_ids[rows], attention_mask[rows]  # [B_i, T]
            used = int(mask.sum(1).max())
            if not mask[:, used:].any():  # right-padded: drop the pad columns no row of this task needs
                ids, mask = ids[:, :used], mask[:, :used]
            view = self._views[self.tasks[i]]
            if labels is None:
                logits = view(ids, mask).float()  # [B_i, C_i]
                out_all.append(F.pad(logits, (0, C - logits.shape[1]), value=float("-inf")))  # [B_i, C]
            elif view.head.kind == "generation":
                tgt = targets[rows]
                tgt = tgt[:, : int((tgt >= 0).sum(1).max())]  # the pad columns no row of this task needs
                out_all.append(view(ids, mask, targets=tgt).float())  # [B_i]
            else:
                out_all.append(F.cross_entropy(view(ids, mask).float(), labels[rows], reduction="none"))
            rows_all.append(rows)
        order = torch.cat(rows_all)  # [B]: the batch row of each grouped row
        return torch.cat(out_all)[torch.argsort(order)]  # [B, C] or [B], in batch order


# -- assembling a task's model ----------------------------------------------------------------------
def build_model(backbone: Backbone, spec, prompt: torch.Tensor | nn.Module, head: str | None = None,
                label_temperature: float = 0.05, seed: int = 0, prefix_projection: int = 0,
                position: str = "after-cls") -> PromptedModel:
    """A PromptedModel for one task. ``prompt`` is a [P, H] prompt, an [L, 2, P, D] prefix, or a prompt-source
    module; ``prefix_projection`` > 0 reparameterises a prefix while it trains (PrefixPrompt); ``position``
    places a prompt on a BERT-style encoder (after-cls: [CLS] prompt text; front: prompt [CLS] text)."""
    kind = resolve_head(spec, backbone, head)
    if isinstance(prompt, torch.Tensor):
        check_positions(backbone, spec, prompt.shape[2] if is_prefix(prompt) else prompt.shape[0])
        if is_prefix(prompt):
            check_prefix_fits(tuple(prompt.shape), backbone, "this prefix")
            source = PrefixPrompt(prompt, projection=prefix_projection, seed=seed)
        else:
            if prompt.shape[-1] != backbone.hidden_size:
                raise LibraryError(f"prompt of hidden size {prompt.shape[-1]} does not fit backbone "
                                   f"'{backbone.name}' of hidden size {backbone.hidden_size}")
            source = SoftPrompt(prompt)
    else:
        source = prompt
    head_module = make_head(spec, backbone, kind, label_temperature=label_temperature, seed=seed)
    pm = PromptedModel(backbone, source, head_module, position=position)
    pm = pm.to(pm.device)  # prompt and head live where the backbone is
    if pm.kind == "prefix":
        check_reaches(pm)
    return pm


def position_limit(backbone: Backbone) -> int | None:
    """How many tokens the backbone's learned absolute position table reaches (BERT, GPT-2, BART; less the
    table's offset), or None where positions are relative or rotary (T5, Llama: no table to run past)."""
    for name, m in backbone.network.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe",
                                                                       "embed_positions"):
            offset = getattr(m, "offset", None)  # BART's learned positions start at 2
            if offset is None:  # RoBERTa's start after the padding index
                offset = m.padding_idx + 1 if m.padding_idx is not None else 0
            return m.num_embeddings - offset
    return None


def check_positions(backbone: Backbone, spec, prompt_length: int) -> None:
    """P virtual tokens (a prompt's, or a prefix's: BERT counts a cache's length into its positions) and the
    task's longest input (and, on a decoder, its target) must fit the backbone's position table: one line
    naming the limit, not an index error deep in the backbone."""
    limit, T = position_limit(backbone), getattr(spec, "max_length", None)
    if limit is None or T is None:
        return
    if getattr(spec, "is_generation", False) and backbone.family == "decoder":
        T += spec.max_target_length
    P = prompt_length
    if P + T > limit:
        what = "max_length" + (" + max_target_length" if T != spec.max_length else "")
        room = f"use --prompt-length at most {limit - T}" if limit > T else f"lower the task's {what}"
        raise TrainingError(f"--prompt-length {P} plus the {what} of task '{spec.name}' ({T}) is {P + T} "
                            f"positions, past the position limit of backbone '{backbone.name}' ({limit}); {room}")


def check_prefix_fits(shape: tuple, backbone: Backbone, what: str) -> None:
    """A prefix [L, 2, P, D] must match the backbone's layers and key/value width (one line naming both)."""
    geo = prefix_geometry(backbone.network, backbone.family)
    L, D = shape[0], shape[-1]
    if (L, D) != (geo.num_layers, geo.kv_size):
        raise LibraryError(f"{what} is for {L} layers of key/value width {D}, but backbone '{backbone.name}' has "
                           f"{geo.describe()} (width {geo.kv_size}); use a prefix trained on a backbone of its shape")


def freeze_backbone(pm: nn.Module) -> None:
    """No backbone weight trains (a PromptedModel's or a MultiTaskModel's network)."""
    for p in pm.network.parameters():
        p.requires_grad_(False)


def trained_label_temperature(meta: dict, default: float = 0.05) -> float:
    """The label-similarity temperature a library prompt was trained with (its run's config), else ``default``.

    Single-task runs before label_temperature was its name wrote it as ``temperature``; in a multi-task run's
    config ``temperature`` is the task-sampling temperature, so it never counts there."""
    conf = meta.get("config") or {}
    t = conf.get("label_temperature")
    if t is None and "task" in conf:
        t = conf.get("temperature")
    return float(t) if t is not None else default


def from_library(entry, backbone: Backbone, spec, head: str | None = None,
                 label_temperature: float | None = None) -> PromptedModel:
    """A PromptedModel for ``spec`` with a library prompt (its head weights when it was trained on that task,
    its backbone delta when it was tuned jointly). ``label_temperature`` (label-similarity head) defaults to
    the one the prompt was trained with."""
    if label_temperature is None:
        label_temperature = trained_label_temperature(entry.meta)
    check_compatible(entry.meta, entry.name, backbone.name, backbone.family, backbone.hidden_size)
    same_task = entry.meta.get("task") == spec.name
    kind = head or (entry.meta.get("head") if same_task else None)
    pm = build_model(backbone, spec, load_source(entry) or entry.prompt, head=kind,
                     label_temperature=label_temperature, position=prompt_position(entry.meta))
    head_state = entry.extra("head")
    if head_state and same_task and pm.head.kind == "linear":
        pm.head.proj.load_state_dict({k.split(".", 1)[1]: v for k, v in head_state.items()})
    delta = entry.extra("backbone")
    if delta:
        missing = set(delta) - set(dict(pm.network.named_parameters()))
        if missing:
            raise LibraryError(f"prompt '{entry.name}' holds backbone weights '{sorted(missing)[0]}' that "
                               f"'{backbone.name}' lacks; load it with the backbone it was tuned on "
                               f"('{entry.meta.get('backbone')}')")
        pm.network.load_state_dict(delta, strict=False)
    if entry.meta.get("lora"):  # tuned with --adapter lora: PEFT's LoRA layers, frozen
        load_lora(pm.network, entry.meta["lora"], entry.extra("lora") or {}, f"prompt '{entry.name}'")
    return pm
