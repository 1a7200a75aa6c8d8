"""Two forms of deep prompt on a frozen encoder, side by side: which one learns a pair task?

  kv      prefix tuning / P-tuning v2 as composer trains it (``--kind prefix``): P key and value vectors in front
          of every attention layer's own, [L, 2, P, D], started at the keys and values a random input-level
          prompt induces
  hidden  deep prompt tuning in the hidden-state form: an input-level prompt [P, H] (where composer puts it:
          after [CLS] on BERT-style encoders) whose P positions' hidden states are replaced by trainable vectors
          at the input of every later layer, [L, P, H] in all, started at the states the prompt itself
          produces there over an empty input ([CLS] [SEP]; in an encoder those states depend on the input, so
          step 0 is near the plain prompt's model, not equal to it)
  prompt  the input-level prompt alone (``--kind prompt``)

Every form: the same task, head (the backbone's default), random-init seed, data order, batch, steps, schedule
(linear decay, 6% warm-up), clipping and dev evaluations (a fixed subset), the best dev score kept; each its own
learning rate (--lrs). Dev scores only: nothing here is chosen on test.

    python bench/deep_forms.py --task qqp --steps 240 --max-eval 300 --threads 2 --out runs/deep-forms.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

FORMS = ("kv", "hidden", "prompt")


def encoder_layers(network: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers (the ModuleList as long as its config's layer count)."""
    n = getattr(network.config, "num_hidden_layers", None)
    for m in network.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise RuntimeError(f"no stack of {n} layers found in {type(network).__name__}")


class HiddenDeep:
    """Replaces the prompt positions' hidden states at the input of layers 1..L-1 with ``weight[l-1]`` [P, H]."""

    def __init__(self, pm, start: int):
        if any(p.requires_grad for p in pm.network.parameters()):
            raise RuntimeError("the hidden-state form needs a frozen backbone (freeze_backbone first): the head "
                               "would encode its label descriptions through the replaced positions")
        self.layers = encoder_layers(pm.network)
        self.start, self.P = start, pm.prompt_source.weight.shape[0]
        captured: list[torch.Tensor] = []

        def grab(_m, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            captured.append(hs[0, start : start + self.P].detach().clone())

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers[1:]]
        one = torch.tensor([[pm.backbone.tokenizer.cls_token_id or 0, pm.backbone.tokenizer.sep_token_id or 0]])
        with torch.no_grad():
            pm.eval()
            embeds, mask, _, _ = pm.prompted(one, torch.ones_like(one))
            pm.hidden(embeds, mask)
        for h in handles:
            h.remove()
        with torch.no_grad():  # the head encodes (and, on a frozen backbone, keeps) its labels before the hooks
            pm(one, torch.ones_like(one))
        self.weight = nn.Parameter(torch.stack(captured))  # [L-1, P, H]: the plain prompt's, over an empty input
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(self.layers[1:])]

    def _hook(self, i: int):
        def replace(_m, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            hs = hs.clone()
            hs[:, self.start : self.start + self.P] = self.weight[i].to(hs.dtype)
            if args:
                return (hs, *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=hs)
        return replace


def run_form(form: str, lr: float, args, bb) -> dict:
    from composer.evaluate import evaluate
    from composer.model import freeze_backbone
    from composer.runstate import BatchPlan, lr_lambda
    from composer.train import TrainConfig, prepare

    tc = TrainConfig(task=args.task, backbone=args.model, kind="prefix" if form == "kv" else "prompt",
                     prompt_length=args.prompt_length, steps=args.steps, batch_size=args.batch_size, lr=lr,
                     seed=args.seed, data_dir=args.data_dir, max_eval=args.max_eval)
    prep = prepare(tc, backbone=bb)
    pm = prep.model
    freeze_backbone(pm)
    params = [p for p in pm.parameters() if p.requires_grad]
    deep = None
    if form == "hidden":
        deep = HiddenDeep(pm, start=1 if pm.after_first else 0)
        params.append(deep.weight)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.schedule, int(tc.warmup * tc.steps), tc.steps))
    dev = prep.dev.subset(args.max_eval, 0)
    pad = bb.tokenizer.pad_token_id
    plan = BatchPlan(len(prep.train), tc.batch_size, tc.seed)
    curve = [(0, evaluate(pm, prep.spec, dev)["score"])]
    t0 = time.time()
    for step in range(tc.steps):
        pm.train()
        b = prep.train.batch(plan.indices(step), pad)
        torch.random.default_generator.manual_seed(tc.seed * 1_000_003 + step)  # dropout, as train.py seeds it
        loss = F.cross_entropy(pm(b["input_ids"], b["attention_mask"]), b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == tc.steps:
            pm.eval()
            curve.append((step + 1, evaluate(pm, prep.spec, dev)["score"]))
            print(f"[{form}] step {step + 1}: dev {curve[-1][1]:.3f}", file=sys.stderr, flush=True)
    trained = sum(p.numel() for p in params)
    if deep is not None:
        for h in deep.handles:
            h.remove()
    return {"lr": lr, "initial": curve[0][1], "best": max(s for _, s in curve), "last": curve[-1][1],
            "curve": curve, "trainable": trained, "s_per_step": (time.time() - t0) / tc.steps,
            "metric": prep.spec.metric}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--task", default="qqp")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--lrs", default="kv=0.03,hidden=0.01,prompt=0.3", help="learning rate per form")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--max-eval", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("PROMPT_COMPOSER_DATA") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    forms = [f for f in args.forms.split(",") if f]
    bad = [f for f in forms if f not in FORMS]
    if bad:
        ap.error(f"unknown form(s) {', '.join(bad)}: use {', '.join(FORMS)}")
    lrs = dict(kv.split("=") for kv in args.lrs.split(",") if kv)
    from composer.backbones import load_backbone
    from composer.demo import machine

    bb = load_backbone(args.model)
    res = {"command": "python bench/deep_forms.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "task": args.task, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
           "prompt_length": args.prompt_length, "max_eval": args.max_eval, "seed": args.seed,
           "machine": machine(), "forms": {}}
    for f in forms:
        res["forms"][f] = run_form(f, float(lrs.get(f, 0.01)), args, bb)
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        from composer.atomic import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
