"""Joint prompt + LoRA: PEFT's LoRA layers in the frozen backbone, trained beside the soft prompt.

No LoRA is written here: ``peft.inject_adapter_in_model`` wraps the target Linear layers of the backbone's
network in place (PEFT's LoraLayer; base weights frozen), so the PromptedModel, its heads, the prefix hooks and
generation see one network and nothing else changes. What this module adds is the glue:

    add_lora(network, settings)      inject LoRA (r, alpha, dropout, target modules) -> the settings as resolved
    lora_state(network)              the LoRA tensors, as saved in a library entry (``lora.safetensors``)
    load_lora(network, settings, t)  a library entry's LoRA back into a network (frozen: inference)
    write_peft_lora(dir, ...)        the same as a PEFT LoRA adapter folder (PeftModel.from_pretrained loads it)

Target modules default to PEFT's own per-architecture choice (query/value projections:
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), so ``--adapter lora`` means what it means in PEFT.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from composer.atomic import atomic_write_text
from composer.errors import LibraryError, TrainingError

_ADAPTER = re.compile(r"\.(lora_[AB]|lora_embedding_[AB])\.default(\.|$)")


def is_lora_param(name: str) -> bool:
    return ".lora_" in name


def default_targets(network) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    model_type = getattr(network.config, "model_type", None)
    targets = MAPPING.get(model_type)
    if not targets:
        raise TrainingError(f"PEFT has no default LoRA target modules for model type {model_type!r}; name them "
                            "with --lora-targets (e.g. q_proj,v_proj)")
    return sorted(targets)


def add_lora(network, settings: dict) -> dict:
    """Inject LoRA into ``network`` in place; -> the settings with the targets resolved (what the library keeps)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = settings.get("targets") or default_targets(network)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    resolved = {"r": int(settings["r"]), "alpha": float(settings["alpha"]), "dropout": float(settings["dropout"]),
                "targets": list(targets)}
    config = LoraConfig(r=resolved["r"], lora_alpha=resolved["alpha"], lora_dropout=resolved["dropout"],
                        target_modules=resolved["targets"], bias="none")
    try:
        inject_adapter_in_model(config, network)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        first = str(e).splitlines()[0] if str(e) else "no module matched"
        raise TrainingError(f"--lora-targets {','.join(resolved['targets'])}: {first[:200]}") from None
    return resolved


def lora_state(network) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32).contiguous().clone()
            for n, p in network.named_parameters() if is_lora_param(n)}


def load_lora(network, settings: dict, tensors: dict[str, torch.Tensor], what: str) -> None:
    """A saved LoRA back into ``network``, frozen (it is read, not trained: eval, compose, generate)."""
    add_lora(network, settings)
    params = dict(network.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise LibraryError(f"{what} holds LoRA weights '{missing[0]}' that this backbone lacks; load it with the "
                           "backbone it was tuned on")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    for n, p in network.named_parameters():
        if is_lora_param(n):
            p.requires_grad_(False)


def peft_key(name: str) -> str:
    """Our parameter name -> the key of PEFT's adapter_model.safetensors (adapter name dropped, as PEFT saves)."""
    return "base_model.model." + _ADAPTER.sub(r".\1\2", name)


def write_peft_lora(out: Path, settings: dict, tensors: dict[str, torch.Tensor], base: str | None,
                    task_type: str | None) -> None:
    """A PEFT LoRA adapter folder: adapter_config.json (LoraConfig's own fields) + adapter_model.safetensors."""
    from peft import LoraConfig

    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=settings["targets"], bias="none", base_model_name_or_path=base,
                        task_type=task_type, inference_mode=True).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in LoraConfig; JSON needs a list
    out.mkdir(parents=True, exist_ok=True)
    save_file({peft_key(n): t.contiguous() for n, t in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
