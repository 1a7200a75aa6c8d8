"""Move static prompts between the library and PEFT prompt-tuning adapters.

A PEFT prompt-tuning adapter is a folder of two files (what ``PeftModel.save_pretrained`` writes):

    adapter_config.json          a PromptTuningConfig: peft_type "PROMPT_TUNING", task_type,
                                 num_virtual_tokens (P), token_dim (H), num_transformer_submodules, ...
    adapter_model.safetensors    key "prompt_embeddings": [num_transformer_submodules * P, H]

``export_peft`` writes one from a library prompt (plus ``prompt-composer.json``, our prompt.json, which
PEFT ignores and ``import_peft`` reads back so a round trip keeps the task and the backbone alias);
``peft.PeftModel.from_pretrained(base_model, folder)`` loads it. ``import_peft`` reads one into the library.
peft itself is not needed for either: the format is plain JSON and safetensors.

Where the prompt goes. PEFT puts the virtual tokens in front of every input token; our PromptedModel does
the same for decoders and encoder-decoders (encoder side), so there the PEFT model gives the same logits
as ours. On BERT-style encoders we keep [CLS] first by default ([CLS] prompt rest, `--prompt-position
after-cls`) while PEFT puts the prompt before [CLS] (prompt [CLS] rest): such an adapter loads and runs,
but its positions differ by the [CLS] placement. A prompt trained with `--prompt-position front` sits where
PEFT puts it, so its export gives PEFT the same outputs as ours; an imported PEFT adapter is recorded as
``position: front`` (ours going home keep theirs).

Encoder-decoders: PEFT's default for SEQ_2_SEQ_LM is two submodules (a prompt on the encoder and one on
the decoder). Our prompts are encoder-side only, so we export num_transformer_submodules = 1, and on
import keep the first P rows (the encoder side) of a two-submodule adapter, saying so in the provenance.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from composer.atomic import atomic_write_text, swap_dir
from composer.backbones import ALIASES, alias_path
from composer.errors import BackboneError, LibraryError
from composer.library import META_FILE, Entry, Library
from composer.lora import write_peft_lora
from composer.mpt import MPT_EXTRA, is_mpt

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "prompt-composer.json"  # our prompt.json, beside the adapter; PEFT ignores it
PEFT_KEY = "prompt_embeddings"  # the name get_peft_model_state_dict gives a prompt-tuning prompt

TASK_TYPE = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}
FAMILY = {"CAUSAL_LM": "decoder", "SEQ_2_SEQ_LM": "encoder-decoder"}  # anything else -> encoder


def _peft_version() -> str | None:
    """The installed peft's version, read from its metadata (peft is not imported)."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_attention_composer(entry: Entry) -> bool:
    """An ATTEMPT composer makes a prompt per example; its [P, H] tensor alone is not the model.
    A distilled one (provenance "distilled": true) is a static prompt and exports fine."""
    prov = entry.meta.get("provenance") or {}
    if prov.get("distilled"):
        return False
    extras = entry.meta.get("extras") or []
    return (prov.get("strategy") == "attention" or "composer" in extras
            or (entry.path / "composer.safetensors").exists())


def _base_model(backbone: str | None) -> tuple[str | None, Path | None]:
    """-> (base_model_name_or_path for PEFT, a local folder that may hold its config.json)."""
    if not backbone:
        return None, None
    if backbone in ALIASES:
        try:
            folder = alias_path(backbone)
        except BackboneError:
            folder = None
        return ALIASES[backbone].hf_id or backbone, folder
    p = Path(backbone).expanduser()
    if p.exists():
        p = p.resolve()
        return str(p), p if p.is_dir() else p.parent
    return backbone, None


def _shape_fields(folder: Path | None) -> dict:
    """num_layers and num_attention_heads from the backbone's config.json when it is at hand.

    PEFT does not use them for prompt tuning and fills them from the model when they are null."""
    out = {"num_layers": None, "num_attention_heads": None}
    try:
        cfg = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return out
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(cfg.get(key), int):
            out["num_layers"] = cfg[key]
            break
    for key in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        if isinstance(cfg.get(key), int):
            out["num_attention_heads"] = cfg[key]
            break
    return out


def adapter_config(prompt: torch.Tensor, family: str, base_model_name_or_path: str | None,
                   num_layers: int | None = None, num_attention_heads: int | None = None) -> dict:
    """The adapter_config.json of a [P, H] prompt: every field PromptTuningConfig has, as PEFT writes it."""
    P, H = prompt.shape
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,  # encoder side only, also for SEQ_2_SEQ_LM (PEFT's default there is 2)
        "num_virtual_tokens": int(P),
        "peft_type": "PROMPT_TUNING",
        "peft_version": _peft_version(),
        "prompt_tuning_init": "RANDOM",  # only matters when PEFT initialises; the weights file overrides it
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": TASK_TYPE[family],
        "token_dim": int(H),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def export_peft(library: Library, name: str, out_dir: str | Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> Path:
    """Write library prompt NAME as a PEFT prompt-tuning adapter folder; -> the folder.

    ``base_model_name_or_path`` defaults to the prompt's backbone: a packaged alias becomes its upstream
    hub id, a local path its absolute path. The folder is written whole or not at all (temp folder +
    rename). Load it with ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)``
    (AutoModelForSeq2SeqLM for encoder-decoders, AutoModel for encoders). Decoders and encoder-decoders
    give the same logits as our PromptedModel; for BERT-style encoders PEFT puts the prompt before [CLS]
    where we put it after, so positions differ by the [CLS] placement. An entry tuned with ``--adapter lora``
    also gets ``out_dir/lora``, a PEFT LoRA adapter: load it first (``PeftModel.from_pretrained(base,
    out_dir / "lora").merge_and_unload()``), then the prompt adapter on the merged model.
    """
    entry = library.load(name)
    meta = entry.meta
    if is_mpt(entry):
        return _export_mpt(entry, out_dir, base_model_name_or_path, overwrite, library)
    if meta.get("kind") == "prefix" and not is_attention_composer(entry):
        return _export_prefix(entry, out_dir, base_model_name_or_path, overwrite, library)
    if is_attention_composer(entry):
        raise LibraryError(f"prompt '{name}' is an attention composer (per-example prompts); distill it first: "
                           f"prompt-composer compose ... --distill")
    family = meta.get("family")
    if family not in TASK_TYPE:
        raise LibraryError(f"prompt '{name}' has family {family!r} in {META_FILE}; a PEFT adapter needs one of "
                           f"{', '.join(TASK_TYPE)} (set \"family\" in {entry.path / META_FILE})")
    out = _check_out(name, out_dir, overwrite, library)
    for stem, why in (("head", "its linear head weights are not part of a PEFT prompt-tuning adapter"),
                      ("backbone", "it was tuned jointly and the backbone weights it needs are not exported")):
        if stem in (meta.get("extras") or []):
            log.warning("prompt '%s': %s; exporting the prompt only", name, why)

    base, folder = _base_model(meta.get("backbone"))
    if base_model_name_or_path is not None:
        base, folder = base_model_name_or_path, None
        p = Path(base).expanduser()
        if p.is_dir():
            folder = p
    config = adapter_config(entry.prompt, family, base, **_shape_fields(folder))
    more = None
    if meta.get("lora"):  # joint prompt + LoRA: the LoRA is a second PEFT adapter, in LORA_DIR of the same folder
        def more(tmp: Path) -> None:
            write_peft_lora(tmp / LORA_DIR, meta["lora"], entry.extra("lora") or {}, base, config["task_type"])
    _write_adapter(out, entry.prompt, config, _sidecar(meta), more)
    log.info("exported prompt '%s' [%d, %d] as a PEFT %s prompt-tuning adapter to %s",
             name, *entry.prompt.shape, config["task_type"], out)
    return out


def _export_mpt(entry: Entry, out_dir, base_model_name_or_path: str | None, overwrite: bool,
                library: Library) -> Path:
    """An MPT entry (shared P*, every source task's rank-r factors) as a PEFT MultitaskPromptTuning adapter: the
    same layout (P* -> prompt_embeddings, u -> prefix_task_cols [K, P, r], v -> prefix_task_rows [K, r, H]),
    task id k = the k-th task of the entry's provenance (written into the sidecar as "task_ids")."""
    meta = entry.meta
    if meta.get("kind", "prompt") != "prompt":
        raise LibraryError(f"prompt '{entry.name}' is an MPT prefix, and PEFT's MultitaskPromptTuning holds "
                           "input-level prompts only; export a task's own prefix (train --multitask --save-prefix "
                           "saves each) instead")
    family = meta.get("family")
    if family not in TASK_TYPE:
        raise LibraryError(f"prompt '{entry.name}' has family {family!r} in {META_FILE}; a PEFT adapter needs one "
                           f"of {', '.join(TASK_TYPE)}")
    tasks = list((meta.get("provenance") or {}).get("tasks") or [])
    factors = entry.extra(MPT_EXTRA) or {}
    u, v = factors.get("u"), factors.get("v")
    if u is None or v is None or u.shape[0] != len(tasks) or u.shape[1] != entry.prompt.shape[0]:
        raise LibraryError(f"prompt '{entry.name}': {MPT_EXTRA}.safetensors must hold u [K, P, r] and v [K, r, H] "
                           f"for its {len(tasks)} tasks; retrain it")
    out = _check_out(entry.name, out_dir, overwrite, library)
    base, folder = _base_model(meta.get("backbone"))
    if base_model_name_or_path is not None:
        base = base_model_name_or_path
        folder = Path(base).expanduser() if Path(base).expanduser().is_dir() else None
    config = dict(adapter_config(entry.prompt, family, base, **_shape_fields(folder)),
                  peft_type="MULTITASK_PROMPT_TUNING", num_tasks=len(tasks), num_ranks=int(u.shape[2]),
                  prompt_tuning_init="RANDOM", prompt_tuning_init_state_dict_path=None, prompt_tuning_init_task=0)
    tensors = {PEFT_KEY: entry.prompt, "prefix_task_cols": u, "prefix_task_rows": v}
    _write_adapter(out, tensors, config, dict(_sidecar(meta), task_ids={t: i for i, t in enumerate(tasks)}))
    log.info("exported MPT prompt '%s' (%d tasks: %s) as a PEFT MultitaskPromptTuning adapter to %s; pass "
             "task_ids in that order", entry.name, len(tasks), ", ".join(tasks), out)
    return out


EXPORT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE, "README.md"})
"""What a previous export may hold: overwrite (--force) replaces a folder of these files only (and LORA_DIR)."""
LORA_DIR = "lora"
"""The LoRA adapter of a joint prompt + LoRA entry, a PEFT LoRA adapter folder inside the prompt's export."""


def _check_out(name: str, out_dir, overwrite: bool, library: Library | None = None) -> Path:
    """The export folder: new, empty, or (with ``overwrite``) a previous export and nothing else.

    --force never removes anything it did not write: the library itself, a folder holding library entries
    or run folders, or any file that is not an adapter's is refused in one line naming what is there."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LibraryError(f"cannot export prompt '{name}' to {out}: it is a file; give a folder path")
    if library is not None:
        root, target = library.root.expanduser().resolve(), out.resolve()
        if target == root or target in root.parents or root in target.parents:
            raise LibraryError(f"cannot export prompt '{name}' to {out}: it is the library at {library.root}, "
                               "or a folder in or above it; give a folder outside the library")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise LibraryError(f"cannot export prompt '{name}': {out} exists and is not empty; "
                           f"give a new folder or pass overwrite (--force)")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if not (p.name in EXPORT_FILES and p.is_file() or _is_lora_export(p)))
    if foreign or CONFIG_FILE not in {p.name for p in out.iterdir()}:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        why = f"it holds {shown}" if foreign else f"it has no {CONFIG_FILE}"
        raise LibraryError(f"cannot export prompt '{name}' to {out} with --force: {why}, so it is not a previous "
                           f"PEFT export (--force replaces only a folder of {', '.join(sorted(EXPORT_FILES))}); "
                           "give a new folder")
    return out


def _is_lora_export(p: Path) -> bool:
    return p.name == LORA_DIR and p.is_dir() and all(f.is_file() and f.name in (CONFIG_FILE, WEIGHTS_FILE)
                                                   for f in p.iterdir())


def _sidecar(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("name", "task", "backbone", "family", "head", "hidden_size", "length",
                                     "kind", "position", "metrics", "provenance", "version")}


def _export_prefix(entry: Entry, out_dir, base_model_name_or_path: str | None, overwrite: bool,
                   library: Library | None = None) -> Path:
    """An [L, 2, P, D] prefix as a PEFT PrefixTuning adapter: prompt_embeddings [P, L*2*D] in PEFT's layout
    (virtual token p's row holds layer 0's key, layer 0's value, layer 1's key, ...), identical logits on
    encoders and decoders. Encoder-decoders are refused: PEFT 0.21 feeds decoder layer l the rows of layer
    (2l mod L) of its table, so a prefix whose layers all differ has no PEFT table that gives it back."""
    meta, prefix = entry.meta, entry.prompt
    family = meta.get("family")
    if family not in ("encoder", "decoder"):
        raise LibraryError(f"prefix '{entry.name}' is for a {family}; PEFT's PrefixTuning layout on encoder-decoders "
                           "repeats some layers' rows for others, so only encoder and decoder prefixes export")
    out = _check_out(entry.name, out_dir, overwrite, library)
    L, _, P, D = prefix.shape
    heads = meta.get("prefix_heads") or (meta.get("provenance") or {}).get("kv_heads")
    base, folder = _base_model(meta.get("backbone"))
    if base_model_name_or_path is not None:
        base, folder = base_model_name_or_path, (Path(base_model_name_or_path).expanduser()
                                                 if Path(base_model_name_or_path).expanduser().is_dir() else None)
    if heads is None:
        heads = _kv_heads(folder) or _shape_fields(folder).get("num_attention_heads")
    if heads is None:
        raise LibraryError(f"prefix '{entry.name}': the backbone's key/value head count is unknown (no config.json "
                           f"at {folder}); pass --base-model with the backbone's local folder")
    config = {
        "auto_mapping": None, "base_model_name_or_path": base, "encoder_hidden_size": int(D),
        "inference_mode": True, "modules_to_save": None, "num_attention_heads": int(heads), "num_layers": int(L),
        "num_transformer_submodules": 1, "num_virtual_tokens": int(P), "peft_type": "PREFIX_TUNING",
        "peft_version": _peft_version(), "prefix_projection": False, "revision": None,
        "task_type": TASK_TYPE[family], "token_dim": int(D),
    }
    table = prefix.permute(2, 0, 1, 3).reshape(P, L * 2 * D)  # [P, L*2*D]
    _write_adapter(out, table, config, _sidecar(meta))
    log.info("exported prefix '%s' %s as a PEFT %s PrefixTuning adapter to %s", entry.name, list(prefix.shape),
             config["task_type"], out)
    return out


def _kv_heads(folder: Path | None) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    v = cfg.get("num_key_value_heads") if isinstance(cfg, dict) else None
    return v if isinstance(v, int) else None


def _write_adapter(out: Path, table: torch.Tensor | dict[str, torch.Tensor], config: dict, sidecar: dict,
                   more=None) -> None:
    """adapter_config.json + adapter_model.safetensors (the table under PEFT_KEY, or a dict of tensors) (+ our
    sidecar, + what ``more(folder)`` writes), written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    tensors = table if isinstance(table, dict) else {PEFT_KEY: table}
    try:
        save_file({k: t.detach().to("cpu", torch.float32).contiguous() for k, t in tensors.items()},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # PEFT / transformers check this key
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / SIDECAR_FILE, json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
        if more is not None:
            more(tmp)
        with open(tmp / WEIGHTS_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        swap_dir(tmp, out)  # an existing folder is empty here, or overwrite was asked for
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LibraryError(f"{path} is not valid JSON ({e}); is this {what}?") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{path} must hold a JSON object")
    return data


def import_peft(library: Library, adapter_dir: str | Path, name: str, backbone_name: str | None = None,
                task: str | None = None, overwrite: bool = False) -> Entry:
    """Read a PEFT prompt-tuning adapter folder into the library as prompt NAME; -> the saved Entry.

    The backbone is ``backbone_name``, else the one recorded by our exporter (prompt-composer.json),
    else the adapter's base_model_name_or_path. Only PROMPT_TUNING adapters hold a plain [P, H] prompt;
    anything else (LoRA, prefix tuning, p-tuning) is refused. Of a two-submodule (encoder and decoder)
    seq2seq adapter the first P rows, the encoder side, are kept.
    """
    src = Path(adapter_dir).expanduser()
    if not src.is_dir():
        raise LibraryError(f"PEFT adapter folder {src} does not exist")
    cfg_path = src / CONFIG_FILE
    if not cfg_path.exists():
        raise LibraryError(f"no {CONFIG_FILE} in {src}: not a PEFT adapter folder "
                           f"(give the folder PeftModel.save_pretrained wrote)")
    cfg = _read_json(cfg_path, "a PEFT adapter config")
    peft_type = str(cfg.get("peft_type"))
    if peft_type not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise LibraryError(f"the adapter in {src} is a {peft_type} adapter; only PROMPT_TUNING (soft prompt) "
                           f"and PREFIX_TUNING adapters can be imported into the prompt library")
    weights = src / WEIGHTS_FILE
    if not weights.exists():
        pickled = " (it has adapter_model.bin, a pickle we do not load: re-save it with " \
                  "save_pretrained(..., safe_serialization=True))" if (src / "adapter_model.bin").exists() else ""
        raise LibraryError(f"no {WEIGHTS_FILE} in {src}{pickled}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LibraryError(f"{weights} is truncated or corrupted ({str(e).splitlines()[0]})") from None
    if PEFT_KEY not in tensors:
        raise LibraryError(f"{weights} has no '{PEFT_KEY}' tensor (keys: {sorted(tensors)})")
    table = tensors[PEFT_KEY]  # [S * P, H]
    if peft_type == "PREFIX_TUNING":
        return _import_prefix(library, src, cfg, table, name, backbone_name, task, overwrite)

    task_type = cfg.get("task_type")
    P = cfg.get("num_virtual_tokens")
    S = cfg.get("num_transformer_submodules") or (2 if task_type == "SEQ_2_SEQ_LM" else 1)
    H = cfg.get("token_dim")
    if not isinstance(P, int) or P < 1:
        raise LibraryError(f"{cfg_path}: num_virtual_tokens is {P!r}; expected a positive integer")
    want = (S * P, H if isinstance(H, int) else table.shape[-1])
    if table.dim() != 2 or tuple(table.shape) != want:
        raise LibraryError(f"{weights}: '{PEFT_KEY}' has shape {tuple(table.shape)} but {CONFIG_FILE} says "
                           f"[num_transformer_submodules * num_virtual_tokens, token_dim] = [{S} * {P}, {want[1]}]")
    prompt = table[:P].float()  # [P, H]: the first block is the encoder side (or the only one)

    ours = _read_json(src / SIDECAR_FILE, "our export sidecar") if (src / SIDECAR_FILE).exists() else {}
    backbone = backbone_name or ours.get("backbone") or cfg.get("base_model_name_or_path")
    if not backbone:
        raise LibraryError(f"the adapter in {src} does not name its base model (base_model_name_or_path is null); "
                           f"say which backbone it belongs to (--backbone)")
    head = ours.get("head") if ours.get("head") in ("verbalizer", "label-similarity", "mlm") else None
    provenance = {
        "imported_from": str(src),
        "peft_type": peft_type,
        "peft_version": cfg.get("peft_version"),
        "task_type": task_type,
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "num_transformer_submodules": S,
    }
    if S > 1:
        provenance["note"] = (f"the adapter has {S} prompt blocks (encoder and decoder side); "
                              f"kept the first {P} rows, the encoder side")
    if ours:
        provenance["exported_from"] = {"name": ours.get("name"), "provenance": ours.get("provenance")}
    meta = {
        "task": task or ours.get("task"),
        "backbone": backbone,
        "family": FAMILY.get(str(task_type), "encoder"),
        "head": head,
        # PEFT trains a prompt in front of every token (before [CLS] on an encoder): so does the entry, unless
        # it is one of ours going home
        "position": ours.get("position") or ("after-cls" if ours else "front"),
        "metrics": ours.get("metrics") or {},
        "provenance": provenance,
    }
    library.save(name, prompt, meta, overwrite=overwrite)
    log.info("imported PEFT adapter %s as prompt '%s' [%d, %d]", src, name, *prompt.shape)
    return library.load(name)


def _import_prefix(library: Library, src: Path, cfg: dict, table: torch.Tensor, name: str,
                   backbone_name: str | None, task: str | None, overwrite: bool) -> Entry:
    """A PEFT PrefixTuning table [P, L*2*D] -> our prefix [L, 2, P, D]. For SEQ_2_SEQ_LM adapters, decoder
    layer l gets what PEFT 0.21 feeds it: the key/value rows of table layer (2l mod L)."""
    P, L, D = cfg.get("num_virtual_tokens"), cfg.get("num_layers"), cfg.get("token_dim")
    if not all(isinstance(x, int) and x > 0 for x in (P, L, D)) or tuple(table.shape) != (P, L * 2 * D):
        raise LibraryError(f"{src}: a PrefixTuning table must be [num_virtual_tokens, num_layers * 2 * token_dim] = "
                           f"[{P}, {L} * 2 * {D}], got {tuple(table.shape)}")
    rows = table.float().view(P, 2 * L, D)
    task_type = str(cfg.get("task_type"))
    idx = [(4 * i) % (2 * L) for i in range(L)] if task_type == "SEQ_2_SEQ_LM" else [2 * i for i in range(L)]
    prefix = torch.stack([rows[:, [i, i + 1]] for i in idx]).permute(0, 2, 1, 3).contiguous()  # [L, 2, P, D]
    ours = _read_json(src / SIDECAR_FILE, "our export sidecar") if (src / SIDECAR_FILE).exists() else {}
    backbone = backbone_name or ours.get("backbone") or cfg.get("base_model_name_or_path")
    if not backbone:
        raise LibraryError(f"the adapter in {src} does not name its base model (base_model_name_or_path is null); "
                           f"say which backbone it belongs to (--backbone)")
    _, folder = _base_model(backbone)
    hidden = ours.get("hidden_size") or (_hidden_size(folder) if folder else None) or D
    meta = {"task": task or ours.get("task"), "backbone": backbone, "family": FAMILY.get(task_type, "encoder"),
            "hidden_size": int(hidden), "kind": "prefix", "head": ours.get("head"),
            "metrics": ours.get("metrics") or {},
            "provenance": {"imported_from": str(src), "peft_type": "PREFIX_TUNING",
                           "peft_version": cfg.get("peft_version"), "task_type": task_type,
                           "kv_heads": cfg.get("num_attention_heads")}}
    library.save(name, prefix, meta, overwrite=overwrite)
    log.info("imported PEFT PrefixTuning adapter %s as prefix '%s' %s", src, name, list(prefix.shape))
    return library.load(name)


def _hidden_size(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    v = cfg.get("hidden_size") or cfg.get("d_model") if isinstance(cfg, dict) else None
    return v if isinstance(v, int) else None
