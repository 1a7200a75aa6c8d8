"""Benchmark: all-pairs prompt similarity against one plain matmul of the same size.

For N prompts of shape [P, H] (float32, CPU by default), times
``composer.similarity.pairwise(x, None, metric)`` for cos-avg and cos-tok and, in the
same process on the same data, the matmul each one reduces to:

- cos-tok: [N, P*H] @ [P*H, N]  (the metric is one matmul of row-normalised tokens)
- cos-avg: [N, H] @ [H, N]      (the metric also has to read all N*P*H numbers for the
  mean over P, which the bare matmul does not; the table shows that part separately)

Reports the median of several repeats, the ratio metric / matmul, and pairs per second
(constant pairs/s across N = time linear in the number of pairs). Not a test.

    python bench/similarity.py                       # N = 100, 1000, 5000; P = 100, H = 768
    python bench/similarity.py --sizes 100 1000 --out runs/bench-similarity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from composer.similarity import pairwise


def timed(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def repeats_for(n: int, base: int) -> tuple[int, int]:
    """(repeats, warmup): fewer for big N, where one run takes tens of seconds."""
    if n >= 5000:
        return 2, 0
    if n >= 1000:
        return max(3, base // 2), 1
    return base, 1


def measure(n: int, P: int, H: int, repeats: int, seed: int, device: torch.device) -> dict:
    """{metric: (metric seconds, matmul seconds, mean-over-P seconds or None)} for N = n prompts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, P, H, generator=gen, dtype=torch.float32).to(device)  # [N, P, H]
    flat = x.reshape(n, P * H)  # [N, P*H], a view
    avg = x.mean(dim=1)  # [N, H]
    reps, warm = repeats_for(n, repeats)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def go():
            fn()
            sync()

        return timed(go, reps, warm)

    return {
        "cos-tok": (run(lambda: pairwise(x, None, "cos-tok")), run(lambda: flat @ flat.T), None, reps),
        "cos-avg": (
            run(lambda: pairwise(x, None, "cos-avg")),
            run(lambda: avg @ avg.T),
            run(lambda: x.mean(dim=1)),
            reps,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000], help="numbers of prompts N")
    ap.add_argument("--prompt-len", type=int, default=100, help="prompt tokens P")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size H")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats for small N (fewer for big N)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    P, H = args.prompt_len, args.hidden
    rows = []
    for n in args.sizes:
        results = measure(n, P, H, args.repeats, args.seed, device)
        pairs = n * n
        for metric, (t_metric, t_matmul, t_mean, reps) in results.items():
            rows.append(
                {
                    "metric": metric,
                    "N": n,
                    "P": P,
                    "H": H,
                    "pairs": pairs,
                    "repeats": reps,
                    "seconds": t_metric,
                    "matmul_seconds": t_matmul,
                    "mean_over_P_seconds": t_mean,
                    "ratio": t_metric / t_matmul,
                    "pairs_per_second": pairs / t_metric,
                }
            )

    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device.type}, "
        f"{platform.processor() or platform.machine()}, float32, P={P}, H={H}"
    )
    lines = [
        (
            f"All-pairs similarity of N prompts [{P}, {H}] vs one matmul of the same size ({env}); "
            "median of repeats."
        ),
        "",
        "| metric | N | pairs | metric (s) | matmul (s) | ratio | pairs/s | matmul shape |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = (
            f"[{r['N']}, {P * H}] @ [{P * H}, {r['N']}]"
            if r["metric"] == "cos-tok"
            else f"[{r['N']}, {H}] @ [{H}, {r['N']}]"
        )
        lines.append(
            f"| {r['metric']} | {r['N']:,} | {r['pairs']:,} | {r['seconds']:.4f} | {r['matmul_seconds']:.4f} "
            f"| {r['ratio']:.2f}x | {r['pairs_per_second']:.3g} | {shape} |"
        )
    means = [r for r in rows if r["mean_over_P_seconds"] is not None]
    if means:
        lines += [
            "",
            "cos-avg must also read every number once for the mean over P (the bare matmul does not): "
            + ", ".join(f"N={r['N']:,}: {r['mean_over_P_seconds']:.4f} s" for r in means)
            + ".",
        ]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
