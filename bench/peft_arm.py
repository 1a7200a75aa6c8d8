"""The peft arm of bench/transfer.py: PEFT's PromptTuning (PrefixTuning under --kind prefix), tuned the way
every other arm is.

Same data order, init (random's), loss (our head's, computed on PEFT's output), optimizer, schedule,
clipping, dev evaluations and best-dev checkpoint as a composer run of the same target and seed; the
PEFT model is built by bench/step_overhead.py's PeftArm, which that script checks against composer's
own step. The run's record goes through the bench's records (Bench.run_key / stored / store), so a
finished run is read back instead of trained again.

    from peft_arm import run_peft
    rec = run_peft(bench, "cr-fs", seed=0, steps=40, run_name="peft-s0")

run_peft_generation is the same arm for a generation task on a decoder (bench/dialogue.py): PEFT's own causal-LM
loss, decoded by our generation. Both run in one loop (_run); only the model, the loss and the evaluation differ.

PeftMPTSource is the peft-mpt arm's prompt (and bench/mpt.py's peer): PEFT's MultitaskPromptEmbedding with
PEFT's own target init from an exported MPT entry, run as a composer prompt source.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from step_overhead import Loss, PeftArm, PeftPrefixArm


def head_loss(head, model, label_temperature: float, max_grad_norm: float) -> Loss:
    """Our head's loss on PEFT's outputs: label similarity (encoders), single-token verbalizer (decoders)."""
    loss = Loss(decoder=head.kind == "verbalizer", label_ids=None, label_emb=None,
                temperature=label_temperature, max_grad_norm=max_grad_norm)
    if head.kind == "label-similarity":
        with torch.no_grad():
            loss.label_emb = head.label_embeddings(model).detach().clone()  # [C, H]
    elif head.kind == "verbalizer" and head.single:
        loss.label_ids = torch.tensor([t[0] for t in head.label_token_ids])  # [C]
    else:
        raise RuntimeError(f"the peft arm supports the label-similarity and single-token verbalizer heads, "
                           f"not {head.kind}")
    return loss


def peft_scores(arm: PeftArm | PeftPrefixArm, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T], mask [B, T] (right-padded) -> label scores [B, C], as our head scores them.

    PromptTuning puts the P virtual tokens in front (before [CLS]), so its outputs cover [B, P+T]; a
    PrefixTuning prefix has no positions of its own, so its outputs cover the T input positions.
    """
    L = arm.loss_fn
    B, T = input_ids.shape
    device = arm.prompt().device
    input_ids, mask = input_ids.to(device), mask.to(device)
    out = arm.model(input_ids=input_ids, attention_mask=mask)
    front = (out.logits if L.decoder else out.last_hidden_state).shape[1] - T  # P, or 0 for a prefix
    full = torch.cat([mask.new_ones(B, front), mask], 1)  # [B, front+T]
    if L.decoder:
        last = full.sum(1) - 1  # the last real position
        logits = out.logits[torch.arange(B), last]  # [B, V]
        return F.log_softmax(logits.float(), dim=-1)[:, L.label_ids.to(device)]
    hidden = out.last_hidden_state  # [B, front+T, H]
    m = full.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)  # [B, H]
    return F.normalize(pooled.float(), dim=-1) @ L.label_emb.to(device).T / L.temperature


@torch.no_grad()
def peft_logits(arm: PeftArm, enc, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Scores [N, C] in the split's order; rows batched by length, as composer.evaluate.predict does."""
    arm.model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    out: list = [None] * len(enc)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = enc.batch(idx, pad_id)
        for i, row in zip(idx, peft_scores(arm, b["input_ids"], b["attention_mask"]).float().cpu()):
            out[i] = row
    return torch.stack(out)


def _run(bench, task: str, seed: int, steps: int, run_name: str, build, peer: str = "PromptTuning") -> dict:
    """The loop both PEFT arms share -> the run's record (read back from bench.runs/TASK/RUN_NAME when finished).

    Same data (k-shot included), init (random's), optimizer, schedule, clipping, dev evaluations and best-dev
    prompt as a composer run of the same target and seed. ``build(prep, tc)`` makes the arm: (its prompt
    parameter, its optimizer over what trains, step_loss(batch) in train mode, evaluate(enc, keep) -> the
    task's scores, with predictions when ``keep``).
    """
    from composer.runstate import BatchPlan, lr_lambda
    from composer.train import TrainConfig, prepare

    cfg = bench.cfg
    run_dir = bench.runs / task / run_name
    rkey = bench.run_key(arm="peft", task=task, init="random", seed=seed, steps=steps,
                         prompt_length=cfg.prompt_length)
    rec = bench.stored(run_dir / "record.json", rkey)
    if rec is not None:
        return rec
    bench.may_start(f"{task} {run_name}")
    tc = TrainConfig(task=task, backbone=cfg.model, prompt_length=cfg.prompt_length, kind=cfg.kind, steps=steps,
                     batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, k_shot=cfg.k_shot, data_dir=cfg.data_dir)
    prep = prepare(tc, backbone=bench.bb, library=bench.lib)  # random's init, data and head
    dev = prep.dev.subset(cfg.max_eval, 0)  # the dev and test subsets of every other arm
    test = prep.test.subset(cfg.max_test, 0) if prep.test is not None else None
    prompt, optimizer, step_loss, evaluate = build(prep, tc)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.schedule, int(tc.warmup * steps), steps))
    pad = bench.bb.tokenizer.pad_token_id
    plan = BatchPlan(len(prep.train), cfg.batch_size, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    curve: tuple[list[int], list[float]] = ([], [])

    def do_eval(step: int) -> float:
        r = evaluate(dev, False)
        curve[0].append(step)
        curve[1].append(r["score"])
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "eval": r}) + "\n")
        return r["score"]

    t0, load0 = time.time(), os.getloadavg()[0]
    best = initial = do_eval(0)
    best_step, best_prompt = 0, prompt.detach().clone()
    for step in range(steps):
        b = prep.train.batch(plan.indices(step), pad)
        torch.random.default_generator.manual_seed(seed * 1_000_003 + step)  # dropout, as train.py
        step_loss(b).backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            s = do_eval(step + 1)
            if s > best:
                best, best_step, best_prompt = s, step + 1, prompt.detach().clone()
    seconds = time.time() - t0
    with torch.no_grad():
        prompt.copy_(best_prompt)
    rec = {"init": f"random (PEFT {peer})", "seed": seed, "mode": "prompt",
           "prompt_length": cfg.prompt_length, "steps": steps, "initial": initial, "dev": best,
           "dev_last": curve[1][-1], "test": None, "best_step": best_step, "curve": curve,
           "seconds": round(seconds, 2), "s_per_step": seconds / steps,
           "load": [round(load0, 2), round(os.getloadavg()[0], 2)], "run_dir": str(run_dir),
           "metric": prep.spec.metric}
    if test is not None:
        r = evaluate(test, True)
        rec["test"] = r["score"]
        if "metrics" in r:  # a generation task: every metric, and a few generations
            rec.update(test_metrics=r["metrics"], examples=r["predictions"][:3])
    return bench.store(run_dir / "record.json", rkey, rec)


def run_peft(bench, task: str, seed: int, steps: int, run_name: str) -> dict:
    """One PEFT PromptTuning run of a classification ``task`` (our head's loss on PEFT's outputs) -> its record.

    ``bench`` is a bench/transfer.py Bench: its cfg (model, batch, lr, prompt length, evaluations), backbone,
    library, run folders, records and time budget.
    """
    from composer.evaluate import score
    from composer.model import freeze_backbone

    prefix = bench.cfg.kind == "prefix"
    if prefix and bench.cfg.prefix_projection:
        raise RuntimeError("the peft arm starts PrefixTuning from random's plain prefix: drop --prefix-projection "
                           "or the peft arm")

    def build(prep, tc):
        freeze_backbone(prep.model)
        loss = head_loss(prep.model.head, prep.model, tc.label_temperature, tc.max_grad_norm)
        init = prep.model.prompt_source.weight.detach().clone()  # [P, H], or a prefix [L, 2, P, D]
        own = types.SimpleNamespace(model=copy.deepcopy(bench.bb.network), family=bench.bb.family)  # PEFT wraps it
        arm = (PeftPrefixArm if prefix else PeftArm)(own, tc.prompt_length, init, tc.lr, loss)
        pad = bench.bb.tokenizer.pad_token_id

        def step_loss(b):
            arm.model.train()
            out = peft_scores(arm, b["input_ids"], b["attention_mask"])  # [B, C]
            return F.cross_entropy(out, b["labels"].to(out.device))

        def evaluate(enc, keep):
            return score(prep.spec, peft_logits(arm, enc, pad), enc)

        return arm.prompt(), arm.optimizer, step_loss, evaluate

    return _run(bench, task, seed, steps, run_name, build, "PrefixTuning" if prefix else "PromptTuning")


def peft_generation_loss(model, P: int, input_ids: torch.Tensor, mask: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """PEFT's own causal-LM loss on input + target: each row's target right after its last real input token,
    labels -100 everywhere else (PEFT puts -100 under its P virtual tokens itself). A token-weighted mean over
    the batch, as transformers computes it (our runs average each row's mean; the peer keeps its own)."""
    B = input_ids.shape[0]
    rows = []
    for i in range(B):
        n, t = int(mask[i].sum()), targets[i][targets[i] >= 0]
        rows.append((input_ids[i, :n], t))
    T = max(len(a) + len(t) for a, t in rows)
    ids = input_ids.new_zeros(B, T)
    am = mask.new_zeros(B, T)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (a, t) in enumerate(rows):
        ids[i, : len(a)], ids[i, len(a) : len(a) + len(t)] = a, t
        am[i, : len(a) + len(t)] = 1
        labels[i, len(a) : len(a) + len(t)] = t
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=am.to(device), labels=labels.to(device)).loss


def run_peft_generation(bench, task: str, seed: int, steps: int, run_name: str) -> dict:
    """One PEFT PromptTuning run of a generation ``task`` on a decoder -> its record (read back when finished).

    Trained by PEFT's own forward and loss (peft_generation_loss), in the loop run_peft's arm runs in. Its
    prompt is evaluated by our decoding on the same dev and test subsets as every other arm (a decoder's prompt
    sits in front in both, and bench/generation_speed.py checks that PEFT's forward gives our target NLL), so
    the two differ in training only. PEFT's own generate is not used: with transformers 5 it drops the position
    ids and its tokens after the first can differ.
    """
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from composer.evaluate import evaluate as our_evaluate

    def build(prep, tc):
        ours = prep.model.prompt_source.weight  # [P, H]: random's init; what our evaluation reads
        model = get_peft_model(copy.deepcopy(bench.bb.network),
                               PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tc.prompt_length))
        prompt = model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            prompt.copy_(ours.detach())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=0.0)

        def step_loss(b):
            model.train()
            return peft_generation_loss(model, tc.prompt_length, b["input_ids"], b["attention_mask"], b["targets"])

        def evaluate(enc, keep):
            with torch.no_grad():
                ours.copy_(prompt.detach())
            return our_evaluate(prep.model, prep.spec, enc, keep_predictions=keep)

        return prompt, opt, step_loss, evaluate

    return _run(bench, task, seed, steps, run_name, build)


class PeftMPTSource(torch.nn.Module):
    """PEFT's MultitaskPromptEmbedding (the module a MultitaskPromptTuning PeftModel puts in front) as a composer
    prompt source: forward(embeds [B, T, H], mask) -> [B, P, H], every row task 0 of a one-task target config.

    Its init is PEFT's own target adaptation from a MultitaskPromptTuning adapter (``library export-peft`` of
    an MPT entry): AVERAGE_SOURCE_TASKS (the sources' mean factors) or EXACT_SOURCE_TASK (one source's). Built
    by hand because PEFT 0.21.2's FEATURE_EXTRACTION PeftModel does not pass task_ids to it ("task_ids cannot
    be None" even when given), so a PeftModel cannot run MPT on an encoder such as minilm; the module, its
    parameters and its forward are PEFT's."""

    kind = "prompt"

    def __init__(self, adapter: Path, init: str, word_embeddings, source_task: int = 0):
        from peft import MultitaskPromptTuningConfig
        from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding

        conf = json.loads((Path(adapter) / "adapter_config.json").read_text())
        config = MultitaskPromptTuningConfig(
            task_type="FEATURE_EXTRACTION", num_virtual_tokens=conf["num_virtual_tokens"],
            token_dim=conf["token_dim"], num_transformer_submodules=1, num_tasks=1, num_ranks=conf["num_ranks"],
            prompt_tuning_init=init, prompt_tuning_init_task=source_task,
            prompt_tuning_init_state_dict_path=str(Path(adapter) / "adapter_model.safetensors"))
        super().__init__()
        self.encoder = MultitaskPromptEmbedding(config, word_embeddings)
        self.P = conf["num_virtual_tokens"]

    @property
    def length(self) -> int:
        return self.P

    def forward(self, embeds, mask=None):
        B = embeds.shape[0]
        indices = torch.arange(self.P, device=embeds.device).expand(B, self.P)
        return self.encoder(indices, torch.zeros(B, dtype=torch.long, device=embeds.device))

    def static(self):
        return self.forward(torch.zeros(1, 1, 1, device=self.encoder.embedding.weight.device))[0].detach()
