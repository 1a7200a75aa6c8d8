"""Speed of generation tasks with a prompt: one training step, and batched decoding, side by side with the peers.

Training step (one fixed batch of a generation task's rows: input + target, P prompt tokens in front; forward ->
the target tokens' NLL -> backward -> clip -> AdamW):

  (a) prompt-composer: the PromptedModel built by composer/train.py's prepare, stepped by composer/loop.py's
      Optimizer and training_step, as train.py's loop does (loss: each row's mean target NLL, averaged);
  (b) PEFT PromptTuning (CAUSAL_LM) with its own loss (labels -100 outside the targets; a token-weighted
      mean), its prompt copied from (a)'s init (bench/peft_arm.py's peft_generation_loss).

Before timing, the script checks that (a) and (b) compute the same target NLL: (a)'s per-row NLL weighted by
the rows' target lengths equals (b)'s loss.

Decoding (greedy, cache on, the same left-padded rows, the same prompt, max new tokens N):

  (a) prompt-composer: PromptedModel.generate (composer/generation.py: its own loop over the decoder);
  (c) the bare backbone's generate on inputs_embeds built by hand ([prompt, left-padded row embeddings],
      P ones in front of the mask): the limit;
  (b) PEFT PromptTuning's generate on the input ids (for reference).

(a) and (c) must return the same tokens (checked; the script stops if not). (b) is reported either way: with
transformers 5 and this PEFT, PEFT's generate drops the position ids it is handed ("Position ids are not
supported for parameter efficient tuning") and its tokens after the first can differ from (a) and (c), which
agree with each other. Tokens per second = the rows' new tokens
up to EOS over the call's wall time; arms interleaved (a, c, b, a, c, b, ...) so drift hits all alike.

    python bench/generation_speed.py --model smollm2-135m --task e2e-nlg --threads 2 --out gen-speed.json
    python bench/generation_speed.py --device cuda --mixed-precision bf16     # on a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from peft_arm import peft_generation_loss  # noqa: E402
from step_overhead import cpu_label, environment, quantiles  # noqa: E402
from transfer import default_data_dir, git_commit  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_batch(enc, B: int, pad_id: int) -> dict:
    """The B rows of the split with the longest inputs (a full batch: the step's worst case is timed)."""
    order = sorted(range(len(enc)), key=lambda i: -len(enc.ids[i]))[:B]
    return enc.batch(sorted(order), pad_id)


def train_step_bench(args, bb) -> dict:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from composer.loop import Optimizer, RunFolder, make_accelerator
    from composer.train import TrainConfig, prepare

    cfg = TrainConfig(task=args.task, backbone=bb.name, prompt_length=args.prompt_length, batch_size=args.batch_size,
                      lr=0.3, steps=10_000, warmup=0.0, schedule="constant", seed=0, data_dir=args.data_dir,
                      mixed_precision=args.mixed_precision, run_dir=str(Path(args.tmp) / "gen-speed"))
    prep = prepare(cfg, backbone=bb)
    acc = make_accelerator(cfg.mixed_precision, False)
    opt = Optimizer(cfg, prep.model)
    model, opt.optimizer = acc.prepare(prep.model, opt.optimizer)
    run = RunFolder(Path(cfg.run_dir), acc)
    dev = acc.device
    pad = bb.tokenizer.pad_token_id
    b = fixed_batch(prep.train, args.batch_size, pad)
    ids, mask, targets = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["targets"].to(dev)
    prompt = acc.unwrap_model(model).prompt_source.weight
    import copy

    own = copy.deepcopy(bb.network)
    peft_model = get_peft_model(own, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                         num_virtual_tokens=args.prompt_length))
    peft_prompt = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        peft_prompt.copy_(prompt.detach())
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_opt = torch.optim.AdamW(peft_params, lr=cfg.lr)

    # the check: the same NLL, reduced two ways
    ours, theirs = same_target_nll(acc, model, peft_model, ids, mask, targets, args.mixed_precision,
                                   lambda: peft_generation_loss(peft_model, args.prompt_length, ids, mask, targets))
    check = {"ours_token_mean": ours, "peft_loss": theirs, "abs_diff": abs(ours - theirs)}
    step_a = our_step(cfg, acc, model, opt, run, ids, mask, targets, dev)

    def step_b():
        with acc.autocast():
            loss = peft_generation_loss(peft_model, args.prompt_length, ids, mask, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_params, cfg.max_grad_norm)
        peft_opt.step()
        peft_opt.zero_grad(set_to_none=True)

    times, _ = time_pair(step_a, step_b, args.warmup, args.repeats, dev, "train repeat")
    stats = pair_stats(times)
    out = {"B": args.batch_size, "T_input": int(mask.sum(1).max()), "T_target": int((targets >= 0).sum(1).max()), "P": args.prompt_length,
           "check": check, "arms": stats, "ratio_a_over_b": stats["a"]["median_ms"] / stats["b"]["median_ms"],
           "median_paired_ratio": statistics.median(x / y for x, y in zip(times["a"], times["b"]))}
    del peft_model, own
    return out, prep


def time_pair(step_a, step_b, warmup: int, repeats: int, dev: torch.device, label: str = "repeat"):
    """Time two training steps in turn (a, b, then b, a, ...: drift and cache warmth fall on both alike), after
    ``warmup`` untimed rounds -> ({"a": [s], "b": [s]}, {"a": peak bytes, "b": ...}; peaks on CUDA only)."""
    times, peaks = {"a": [], "b": []}, {"a": 0, "b": 0}
    for r in range(warmup + repeats):
        for k, fn in (("a", step_a), ("b", step_b)) if r % 2 == 0 else (("b", step_b), ("a", step_a)):
            gc.collect()
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
                if dev.type == "cuda":
                    peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated(dev))
        print(f"  {label} {r + 1}/{warmup + repeats}", file=sys.stderr, flush=True)
    return times, peaks


def pair_stats(times: dict) -> dict:
    """Quartiles of each arm's step times, in ms."""
    return {k: dict(zip(("q1_ms", "median_ms", "q3_ms"), (x * 1e3 for x in quantiles(v)))) for k, v in times.items()}


def same_target_nll(acc, model, peer, ids, mask, targets, precision: str, peer_loss) -> tuple[float, float]:
    """(a)'s target NLL (per-row means, reduced to the token mean) and the peer's ``peer_loss()``, in eval mode
    -> (ours, theirs); exits when they disagree (the two arms must compute the same loss). Both end in train mode."""
    model.eval(), peer.eval()
    with torch.no_grad(), acc.autocast():
        rows = model(ids, mask, targets=targets).float()  # [B] mean NLL per row
        theirs = float(peer_loss())
    n = (targets >= 0).sum(1).float()
    ours = float((rows * n).sum() / n.sum())
    tol = 2e-2 if precision == "bf16" else 1e-3
    if abs(ours - theirs) > tol * max(1.0, abs(theirs)):
        raise SystemExit(f"(a) and (b) disagree on the target NLL: {ours:.6f} vs {theirs:.6f}")
    model.train(), peer.train()
    return ours, theirs


def our_step(cfg, acc, model, opt, run, ids, mask, targets, dev):
    """(a)'s training step on the fixed batch, as train.py's loop runs it: seed_step, forward under autocast,
    training_step (backward, clip, optimizer, schedule); each call one step further."""
    from composer.loop import seed_step, training_step

    step_no = [0]

    def step():
        seed_step(cfg.seed, step_no[0], dev)
        with acc.autocast():
            loss = model(ids, mask, targets=targets).mean()
        training_step(acc, loss, opt, cfg.max_grad_norm, step_no[0], run, cfg.lr)
        step_no[0] += 1
    return step


def new_tokens(tokens: torch.Tensor, eos: int | None) -> int:
    """The rows' tokens up to (and with) their first EOS."""
    total = 0
    for row in tokens.tolist():
        total += (row.index(eos) + 1) if eos is not None and eos in row else len(row)
    return total


def decode_bench(args, bb, prep) -> dict:
    import copy

    from peft import PromptTuningConfig, TaskType, get_peft_model

    from composer.encoding import eos_id

    pm = prep.model.eval()
    dev = next(pm.parameters()).device
    pad = bb.tokenizer.pad_token_id
    enc = prep.dev if prep.dev is not None else prep.train
    b = fixed_batch(enc, args.gen_batch_size, pad)
    ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
    # left-padded copies for the peers (composer left-aligns right-padded rows itself)
    shift = (ids.shape[1] - mask.sum(1)).tolist()
    lids = torch.stack([torch.roll(r, s) for r, s in zip(ids, shift)])
    lmask = torch.stack([torch.roll(r, s) for r, s in zip(mask, shift)])
    prompt = pm.prompt_source.weight.detach()
    P = prompt.shape[0]
    N = args.max_new_tokens
    net = bb.network
    eos = eos_id(bb.tokenizer)
    peft_model = get_peft_model(copy.deepcopy(net), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                        num_virtual_tokens=P)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.mixed_precision == "bf16"
                else torch.autocast(dev.type, enabled=False))

    @torch.no_grad()
    def run_a():
        with autocast:
            return pm.generate(ids, mask, max_new_tokens=N)

    @torch.no_grad()
    def run_c():
        with autocast:
            x = net.get_input_embeddings()(lids)
            x = torch.cat([prompt.to(x.dtype).unsqueeze(0).expand(len(x), -1, -1), x], 1)
            m = torch.cat([lmask.new_ones(len(x), P), lmask], 1)
            return net.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=N, do_sample=False,
                                pad_token_id=pad, eos_token_id=eos)

    @torch.no_grad()
    def run_b():
        with autocast:
            out = peft_model.generate(input_ids=lids, attention_mask=lmask, max_new_tokens=N, do_sample=False,
                                      pad_token_id=pad, eos_token_id=eos)
        return out[:, lids.shape[1]:] if out.shape[1] > N else out

    arms = {"a": run_a, "c": run_c, "b": run_b}
    outs = {k: fn() for k, fn in arms.items()}  # warm, and the tokens to compare

    def cut(t):
        return [r[: r.index(eos) + 1] if eos in r else r for r in t.tolist()]

    same = {f"a=={k}": cut(outs["a"]) == cut(outs[k]) for k in ("b", "c")}
    if not same["a==c"]:
        raise SystemExit("(a) and (c) decode different tokens from the same prompt and rows")
    times = {k: [] for k in arms}
    toks = {k: new_tokens(outs[k], eos) for k in arms}
    for r in range(args.gen_repeats):
        order = list(arms)[r % 3:] + list(arms)[: r % 3]
        for k in order:
            gc.collect()
            sync(dev)
            t = time.perf_counter()
            arms[k]()
            sync(dev)
            times[k].append(time.perf_counter() - t)
        print(f"  decode repeat {r + 1}/{args.gen_repeats}", file=sys.stderr, flush=True)
    stats = {k: {"median_s": statistics.median(v), "tokens": toks[k], "tokens_per_s": toks[k] / statistics.median(v)}
             for k, v in times.items()}
    del peft_model
    return {"B": args.gen_batch_size, "max_new_tokens": N, "P": P, "same_tokens": same, "arms": stats,
            "tps_ratio_a_over_c": stats["a"]["tokens_per_s"] / stats["c"]["tokens_per_s"],
            "tps_ratio_a_over_b": stats["a"]["tokens_per_s"] / stats["b"]["tokens_per_s"]}


def markdown(res: dict) -> str:
    t, d, env = res["train"], res["decode"], res["machine"]
    where = (f"{env.get('gpu', env['device'])}" if res["device"].startswith("cuda")
             else f"{cpu_label(env['cpu'], env.get('cpu_isa'))}, {env['threads']} threads")
    lines = [f"Command: `{res['command']}`", "", f"Commit {res['commit']}; {where}; torch {env['torch']}, "
             f"transformers {env['transformers']}, peft {env['peft']}; {res['model']} on `{res['task']}` rows, "
             f"precision {res['mixed_precision']}.", "",
             f"Training step (B = {t['B']}, longest input {t['T_input']} + target {t['T_target']} tokens, P = {t['P']}; "
             f"(a) and (b) agree on the target NLL: {t['check']['ours_token_mean']:.5f} vs {t['check']['peft_loss']:.5f}):",
             "", "| arm | median ms/step | IQR |", "|---|---|---|"]
    names = {"a": "prompt-composer", "b": "PEFT PromptTuning", "c": "bare backbone generate"}
    for k, v in t["arms"].items():
        lines.append(f"| {names[k]} | {v['median_ms']:.0f} | {v['q1_ms']:.0f}-{v['q3_ms']:.0f} |")
    lines += ["", f"Ratio (a)/(b) of medians {t['ratio_a_over_b']:.3f}, median of paired ratios "
                  f"{t['median_paired_ratio']:.3f}.", "",
              f"Greedy decoding, cache on (B = {d['B']} rows, up to {d['max_new_tokens']} new tokens, P = {d['P']}; "
              f"same tokens: {', '.join(f'{k} {v}' for k, v in d['same_tokens'].items())}):", "",
              "| arm | median s/call | new tokens | tokens/s |", "|---|---|---|---|"]
    for k in ("a", "c", "b"):
        v = d["arms"][k]
        lines.append(f"| {names[k] if k != 'b' else 'PEFT PromptTuning generate'} | {v['median_s']:.2f} | "
                     f"{v['tokens']} | {v['tokens_per_s']:.1f} |")
    lines += ["", f"Tokens/s (a)/(c) {d['tps_ratio_a_over_c']:.3f}, (a)/(b) {d['tps_ratio_a_over_b']:.3f}."]
    return "\n".join(lines) + "\n"


def step_bench_args(doc: str, argv: list[str] | None, add=None) -> argparse.Namespace:
    """The options of a one-batch step benchmark on a generation task (this script's and bench/lora_step.py's):
    backbone, task, device, batch, timing repeats, outputs; ``add(ap)`` adds a script's own. Sets the threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="e2e-nlg")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    if add is not None:
        add(ap)
    ap.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--out", help="results JSON")
    ap.add_argument("--out-md", help="also write the markdown section here")
    args = ap.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_outputs(args, res: dict, text: str) -> None:
    """--out (the results as JSON) and --out-md (the markdown), atomically; the markdown to stdout."""
    from composer.atomic import atomic_write_text

    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=1, default=str) + "\n")
    if args.out_md:
        atomic_write_text(Path(args.out_md), text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    def own(ap):
        ap.add_argument("--gen-batch-size", type=int, default=16)
        ap.add_argument("--max-new-tokens", type=int, default=32)
        ap.add_argument("--gen-repeats", type=int, default=5)

    args = step_bench_args(__doc__, argv, own)
    from composer.backbones import load_backbone

    command = "python bench/generation_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    bb = load_backbone(args.model, device=args.device)
    train, prep = train_step_bench(args, bb)
    decode = decode_bench(args, bb, prep)
    env = dict(environment(torch.get_num_threads()), device=args.device)
    res = {"command": command, "commit": git_commit(), "model": args.model, "task": args.task,
           "device": args.device, "mixed_precision": args.mixed_precision, "machine": env,
           "train": train, "decode": decode}
    write_outputs(args, res, markdown(res))


if __name__ == "__main__":
    main()
