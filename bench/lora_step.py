"""Step cost of joint prompt + LoRA: prompt-composer's `--mode joint --adapter lora` vs the same model built by hand
with PEFT (issue 22: within 1.05x).

One fixed batch of a generation task's rows (input + target, P prompt tokens in front; forward -> the target
tokens' NLL -> backward -> clip -> AdamW over the prompt and the LoRA weights):

  (a) prompt-composer: TrainConfig(mode="joint", adapter="lora") through composer/train.py's prepare (PEFT's
      LoRA injected into the backbone in place), stepped by composer/loop.py's Optimizer and training_step;
  (b) by hand: peft.get_peft_model(backbone, LoraConfig(same r, alpha, targets)) and a [P, H] prompt
      nn.Parameter spliced in front of the input embeddings, transformers' own causal-LM loss (labels -100
      outside the targets), one torch.optim.AdamW over both.

Before timing the script checks that (a) and (b) train the same number of parameters and compute the same
target NLL (a's per-row NLL weighted by the rows' target lengths = b's token mean; LoRA's B starts at zero, so
the two agree whatever A holds). Arms alternate (a, b, b, a, ...). Memory is not measured on a CPU (one
process holds both arms); on CUDA each arm's peak allocated memory in a step is reported.

    python bench/lora_step.py --threads 2 --out lora-step.json
    python bench/lora_step.py --device cuda --mixed-precision bf16
"""
from __future__ import annotations

import copy
import os
import shlex
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from generation_speed import (fixed_batch, our_step, pair_stats, same_target_nll, step_bench_args,  # noqa: E402
                              time_pair, write_outputs)
from step_overhead import cpu_label, environment  # noqa: E402
from transfer import git_commit  # noqa: E402


def packed(ids, mask, targets, P: int):
    """Each row's real input then its target, right-padded; labels -100 under the prompt, the input and pads."""
    B = ids.shape[0]
    rows = [(ids[i, : int(mask[i].sum())], targets[i][targets[i] >= 0]) for i in range(B)]
    T = max(len(a) + len(t) for a, t in rows)
    out, am = ids.new_zeros(B, T), mask.new_zeros(B, T)
    labels = torch.full((B, P + T), -100, dtype=torch.long, device=ids.device)
    for i, (a, t) in enumerate(rows):
        out[i, : len(a)], out[i, len(a): len(a) + len(t)] = a, t
        am[i, : len(a) + len(t)] = 1
        labels[i, P + len(a): P + len(a) + len(t)] = t
    return out, torch.cat([am.new_ones(B, P), am], 1), labels


def run(args) -> dict:
    from peft import LoraConfig, get_peft_model

    from composer.backbones import load_backbone
    from composer.loop import Optimizer, RunFolder, make_accelerator
    from composer.lora import is_lora_param
    from composer.train import TrainConfig, prepare

    bb = load_backbone(args.model, device=args.device)
    cfg = TrainConfig(task=args.task, backbone=bb.name, prompt_length=args.prompt_length, batch_size=args.batch_size,
                      lr=0.3, steps=10_000, warmup=0.0, schedule="constant", seed=0, data_dir=args.data_dir,
                      mode="joint", adapter="lora", lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                      mixed_precision=args.mixed_precision, run_dir=str(Path(args.tmp) / "lora-step"))
    plain = copy.deepcopy(bb.network)  # before prepare injects LoRA into bb.network
    prep = prepare(cfg, backbone=bb)
    acc = make_accelerator(cfg.mixed_precision, False)
    opt = Optimizer(cfg, prep.model)
    model, opt.optimizer = acc.prepare(prep.model, opt.optimizer)
    runf = RunFolder(Path(cfg.run_dir), acc)
    dev = acc.device
    b = fixed_batch(prep.train, args.batch_size, bb.tokenizer.pad_token_id)
    ids, mask, targets = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["targets"].to(dev)
    core = acc.unwrap_model(model)
    lora = core.lora

    peer = get_peft_model(plain.to(dev), LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["targets"],
                                                    lora_dropout=lora["dropout"], bias="none"))
    ours_lora = {n: p for n, p in core.network.named_parameters() if is_lora_param(n)}
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if is_lora_param(n):
                p.copy_(ours_lora[n[len("base_model.model."):]])
    prompt = torch.nn.Parameter(core.prompt_source.weight.detach().clone())
    peer_params = [prompt] + [p for p in peer.parameters() if p.requires_grad]
    peer_opt = torch.optim.AdamW([{"params": [prompt], "lr": cfg.lr},
                                  {"params": peer_params[1:], "lr": cfg.lora_lr}])
    pids, pmask, labels = packed(ids, mask, targets, args.prompt_length)
    embed = peer.get_input_embeddings()

    def peer_loss():
        x = torch.cat([prompt.to(embed.weight.dtype).expand(len(pids), -1, -1), embed(pids)], 1)
        return peer(inputs_embeds=x, attention_mask=pmask, labels=labels).loss

    n_ours = sum(p.numel() for g in opt.optimizer.param_groups for p in g["params"])
    n_peer = sum(p.numel() for p in peer_params)
    if n_ours != n_peer:
        raise SystemExit(f"(a) trains {n_ours} numbers, (b) {n_peer}")
    ours, theirs = same_target_nll(acc, model, peer, ids, mask, targets, args.mixed_precision, peer_loss)
    step_a = our_step(cfg, acc, model, opt, runf, ids, mask, targets, dev)

    def step_b():
        with acc.autocast():
            loss = peer_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer_params, cfg.max_grad_norm)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    times, peaks = time_pair(step_a, step_b, args.warmup, args.repeats, dev)
    stats = pair_stats(times)
    out = {"model": args.model, "task": args.task, "B": args.batch_size, "P": args.prompt_length, "lora": lora,
           "trainable": n_ours, "check": {"ours_token_mean": ours, "peer_loss": theirs}, "arms": stats,
           "ratio_a_over_b": stats["a"]["median_ms"] / stats["b"]["median_ms"],
           "median_paired_ratio": statistics.median(x / y for x, y in zip(times["a"], times["b"]))}
    if dev.type == "cuda":
        out["peak_mib"] = {k: v / 2**20 for k, v in peaks.items()}
    return out


def markdown(res: dict, env: dict, command: str) -> str:
    s, lo = res["arms"], res["lora"]
    lines = [f"Command: `{command}`", "",
             f"Commit {env['commit']}; {env['cpu']}, {env['threads']} threads; torch {env['torch']}, transformers "
             f"{env['transformers']}, peft {env['peft']}; {res['model']} on `{res['task']}` rows, B = {res['B']}, "
             f"P = {res['P']}, LoRA r = {lo['r']}, alpha = {lo['alpha']:g} on {', '.join(lo['targets'])}; "
             f"{res['trainable']:,} trainable numbers in each arm; target NLL (a) {res['check']['ours_token_mean']:.5f}"
             f" vs (b) {res['check']['peer_loss']:.5f}.", "",
             "| arm | median ms/step | IQR |", "|---|---|---|",
             f"| prompt-composer --adapter lora | {s['a']['median_ms']:.0f} | {s['a']['q1_ms']:.0f}-{s['a']['q3_ms']:.0f} |",
             f"| PEFT LoRA + a prompt, by hand | {s['b']['median_ms']:.0f} | {s['b']['q1_ms']:.0f}-{s['b']['q3_ms']:.0f} |",
             "", f"Ratio (a)/(b) of medians {res['ratio_a_over_b']:.3f}, median of paired ratios "
                 f"{res['median_paired_ratio']:.3f}."]
    if "peak_mib" in res:
        lines.append(f"Peak memory in a step: (a) {res['peak_mib']['a']:.0f} MiB, (b) {res['peak_mib']['b']:.0f} MiB.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = step_bench_args(__doc__, argv, lambda ap: ap.add_argument("--lora-r", type=int, default=8))
    command = "python bench/lora_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = run(args)
    env = dict(environment(torch.get_num_threads()), device=args.device, commit=git_commit())
    env["cpu"] = cpu_label(env["cpu"], env.get("cpu_isa"))
    write_outputs(args, {"command": command, "machine": env, "result": res}, markdown(res, env, command))

if __name__ == "__main__":
    main()
