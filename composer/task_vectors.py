"""Task vectors of library prompts: recover each candidate's init, pick the base, merge (arithmetic, ties).

A candidate's task vector is its prompt minus the prompt its training started from. That init is not stored;
it is regenerated from what the entry's provenance records (composer/prompts.py made it):

    {"init": "random" | "vocab", "seed": S}   drawn again with that seed, at the entry's length, from the
                                              backbone's embeddings (so the backbone is loaded)
    {"init": "text", "text": T}               the embeddings of T's tokens, cycled to the length
    {"init": "library", "from": NAME,         that entry's prompt (for a prefix trained from a prompt entry,
     "from_sha": H}                           the keys and values it induces: the backbone again), refused
                                              when NAME's tensors no longer hash to H (it was saved again)
    a prefix (kind "prefix") of any of these   the keys and values the input-level init induces

What cannot be recovered, and says so: an entry composed by a strategy (it has no init), imported from a PEFT
adapter, started from an attention composer, or whose library init was removed or saved again. Then give the
base: every
task vector is taken against it instead (``--base NAME``: a library entry of the candidates' shape, or
``--base zeros``: the prompts themselves are the vectors, so arithmetic is a plain weighted sum).

The base, where the merged vector lands: by default the mean of the candidates' inits, which is their one
shared init when they all started from it (the usual case: the same --init and --seed, as the demo trains
its subtask prompts), so that arithmetic with weights summing to 1 is the weighted average. Entries trained
before the provenance kept "from_sha" are taken at their init's name alone.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from composer import merging
from composer.config import ComposeConfig
from composer.errors import ComposeError, ComposerError
from composer.library import Library
from composer.prompts import init_prompt

log = logging.getLogger(__name__)

__all__ = ["BASE_HINT", "recover_init", "merge_candidates", "merge_weights"]

BASE_HINT = ("give the base the task vectors start from: --base NAME (a library entry of the candidates' shape) "
             "or --base zeros (the prompts themselves as the vectors)")
DEFAULT_DENSITY = {"ties": 0.2, "arithmetic": 1.0}
"""The fraction of each task vector kept when --density is not given: TIES' top-20%; arithmetic keeps all."""


def _length(prompt: torch.Tensor) -> int:
    return prompt.shape[2] if prompt.dim() == 4 else prompt.shape[0]  # prefix [L, 2, P, D] or prompt [P, H]


def _unrecoverable(name: str, why: str) -> ComposeError:
    return ComposeError(f"cannot recover the init of '{name}' ({why}), so its task vector is unknown; {BASE_HINT}")


def recover_init(name: str, prompt: torch.Tensor, meta: dict, library: Library,
                 backbone: Callable[[], object]) -> tuple[torch.Tensor, dict]:
    """The prompt entry ``name`` started from -> (init of ``prompt``'s shape, what was recovered).

    ``backbone()`` loads the backbone when the init needs it (random, vocab, text, an induced prefix)."""
    prov = meta.get("provenance") or {}
    kind = meta.get("kind", "prompt")
    how = prov.get("init")
    if how in ("random", "vocab"):
        if not isinstance(prov.get("seed"), int):
            raise _unrecoverable(name, f"its provenance says --init {how} but records no seed")
        spec, record = how, {"init": how, "seed": prov["seed"]}
    elif how == "text":
        if not prov.get("text"):
            raise _unrecoverable(name, "its provenance says --init text but records no text")
        spec, record = f"text:{prov['text']}", {"init": "text", "text": prov["text"]}
    elif how == "library":
        src = prov.get("from")
        if prov.get("composer") or not src:
            raise _unrecoverable(name, f"it continued an attention composer ({src or 'unnamed'}), which has no "
                                       "single init" if prov.get("composer") else "its library init is not named")
        if not library.exists(src):
            raise _unrecoverable(name, f"it started from library entry '{src}', which is no longer in {library.root}")
        if prov.get("from_sha") and library.content_sha(src) != prov["from_sha"]:
            raise _unrecoverable(name, f"its init, library entry '{src}', was saved again after '{name}' was "
                                       "trained from it (its tensors differ)")
        entry = library.load(src)
        record = {"init": "library", "from": src}
        if entry.meta.get("kind", "prompt") == kind:
            init = entry.prompt
        elif kind == "prefix":  # a prefix trained from a prompt entry: the keys and values that prompt induces
            from composer.prefix import induced_prefix

            bb = backbone()
            init = induced_prefix(bb.network, bb.family, entry.prompt)
            record["induced_from"] = "prompt"
        else:
            raise _unrecoverable(name, f"it is a prompt but its init '{src}' is a prefix")
        return _same_shape(name, init, prompt), record
    else:
        if prov.get("strategy"):
            why = f"it was composed with --strategy {prov['strategy']}, not trained from an init"
        elif prov.get("imported_from"):
            why = "it was imported from a PEFT adapter, which does not record its init"
        elif how:
            why = f"it started from a {how} prompt source, which has no single init"
        else:
            why = "its provenance records no init"
        raise _unrecoverable(name, why)
    bb = backbone()
    try:
        init, _ = init_prompt(spec, _length(prompt), bb, seed=record.get("seed", 0), kind=kind)
    except ComposerError as e:
        raise _unrecoverable(name, f"regenerating --init {spec} failed: {e}") from None
    if prov.get("kind") == "prefix" or kind == "prefix":
        record["kind"] = "prefix"
    return _same_shape(name, init, prompt), record


def _same_shape(name: str, init: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    if not isinstance(init, torch.Tensor) or init.shape != prompt.shape:
        got = list(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise _unrecoverable(name, f"the regenerated init is {got} but the prompt is {list(prompt.shape)}")
    return init.detach().float().cpu()


def merge_weights(cands) -> list[float]:
    """The candidates' weights as the graph gives them (what average normalises): a part_of prior (1 when none;
    a negative prior subtracts that subtask), a similar edge's similarity. A negative similarity means
    unrelated, not opposite: it is clipped to 0, as average does."""
    out = []
    for c in cands:
        w = 1.0 if c.weight is None else float(c.weight)
        if c.relation != "part_of" and w < 0:
            log.warning("%s: similarity %.3g is negative; it weighs 0 in the merge (a negative part_of prior "
                        "subtracts a subtask)", c.prompt_name, w)
            w = 0.0
        out.append(w)
    return out


def _base_entry(cfg: ComposeConfig, cands, library: Library) -> tuple[torch.Tensor, dict]:
    name = cfg.base.split(":", 1)[1] if cfg.base.startswith("library:") else cfg.base
    if not library.exists(name):
        raise ComposeError(f"--base {cfg.base}: no prompt '{name}' in the library at {library.root}; give a library "
                           "entry of the candidates' shape or --base zeros")
    e = library.load(name)
    want, kind = cands[0].prompt, cands[0].meta.get("kind", "prompt")
    if e.meta.get("kind", "prompt") != kind or e.prompt.shape != want.shape:
        raise ComposeError(f"--base {name} is a {e.meta.get('kind', 'prompt')} of shape {list(e.prompt.shape)} but "
                           f"the candidates are {kind}s of shape {list(want.shape)}; give a base of their shape")
    return e.prompt.float(), {"base": f"library:{name}", "base_sha": library.content_sha(name)}


def merge_candidates(cfg: ComposeConfig, cands, library: Library,
                     backbone: Callable[[], object]) -> tuple[torch.Tensor, list[float], dict]:
    """arithmetic or ties over the candidates' task vectors -> (prompt, weights, what to record).

    The prompt has the candidates' shape ([P, H] or [L, 2, P, D]); the record (base, inits, density, drop,
    scale) goes into the result and the saved entry's provenance."""
    prompts = [c.prompt.float().cpu() for c in cands]
    record: dict = {}
    if cfg.base is None:  # each candidate against its own init; the merge lands on their mean
        inits, records = [], {}
        for c, p in zip(cands, prompts):
            init, records[c.prompt_name] = recover_init(c.prompt_name, p, c.meta, library, backbone)
            inits.append(init)
            if c.meta.get("config", {}).get("mode") == "joint":
                log.warning("%s was tuned jointly with its backbone; its task vector is the prompt's part alone",
                            c.prompt_name)
        shared = all(torch.equal(i, inits[0]) for i in inits[1:])
        base = inits[0] if shared else torch.stack(inits).mean(0)
        vectors = [merging.task_vector(p, i) for p, i in zip(prompts, inits)]
        record.update(base="init" if shared else "mean of the inits", inits=records)
    else:
        if cfg.base == "zeros":
            base, info = torch.zeros_like(prompts[0]), {"base": "zeros"}
        else:
            base, info = _base_entry(cfg, cands, library)
        vectors = [merging.task_vector(p, base) for p in prompts]
        record.update(info)
    weights = merge_weights(cands)
    density = cfg.density if cfg.density is not None else DEFAULT_DENSITY[cfg.strategy]
    gen = torch.Generator().manual_seed(cfg.seed)  # DARE's masks, candidate by candidate
    names = [c.prompt_name for c in cands]
    merging.check_vectors(vectors, names)
    if cfg.strategy == "ties":
        tau = merging.ties(vectors, weights, density=density, drop=cfg.dare, generator=gen)  # one vector
        prompt = merging.arithmetic(base, [tau], [1.0], scale=cfg.scale)
    else:
        if cfg.dare > 0:
            vectors = [merging.dare(v, cfg.dare, gen) for v in vectors]
        if density < 1:
            vectors = [merging.trim(v, density) for v in vectors]
        prompt = merging.arithmetic(base, vectors, weights, scale=cfg.scale)
    record.update(density=density, dare=cfg.dare, scale=cfg.scale)
    return prompt, weights, record
