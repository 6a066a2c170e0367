"""P3: training throughput of K batched data experts (all experts per step) vs K separately trained experts.

Same synthetic data (K experts x n pairs, image features and gene vectors), same batch size, same number of epochs,
same loss (BLEEP soft-CLIP within each expert), AdamW for every method; plain torch loops (no Lightning):

- ``batched, all experts/step``: one :class:`~spade_sc.model.BatchedExperts` (stacked weights), steps of
  ``ExpertBatchSampler(..., experts_per_step=None)``: every step holds one single-expert batch of every expert,
  embedded with padded batched matrix products, loss within each expert (``loss_fn(i, g, expert_idx)``).
- ``sequential, K loops``: K pairs of :class:`~spade_sc.model.ProjectionHead`, each with its own AdamW, trained one
  after the other on its own expert's batches (the reference implementation's way); same initial weights and same
  batches as the first, so its last-epoch loss matches up to dropout noise (the same training, done K times
  smaller).
- ``batched, 1 expert/step`` (``--no-single`` skips it): the same batched module stepped on single-expert batches
  (``experts_per_step=1``), i.e. the behaviour before multi-expert steps.
- ``Lightning (SpadeModel.train)`` (``--no-lightning`` skips it): the package's training path with
  ``experts_per_step=None``, for reference (DataLoader collation, Lightning loop, callbacks included).

Throughput is pairs seen per second of training (epochs x pairs / wall time; model construction excluded, one
warm-up step per method not timed), the best of ``--repeats`` rounds (methods alternate within a round). Every number
printed is measured in this run.

On a CPU both ways do the same floating-point work (the batched step runs the K experts' matrix products as one
``bmm``) and matrix products take most of the time at batch 512, so the ratio there stays near 1; the gain of
batching is the per-step overhead (kernel launches, Python, optimiser calls) that it removes, which dominates on a
GPU. ``--threads`` defaults to 1: on a shared, oversubscribed machine multi-threaded timings mostly measure threads
waiting for each other, which penalises the many small operations of K sequential loops.

    python benchmarks/training.py                     # K=16 x 2048 pairs, 1280-d features, 200 genes, batch 512
    python benchmarks/training.py --epochs 3 --threads 2 --repeats 3
    python benchmarks/training.py --quick             # K=16 x 512 pairs, batch 128
    python benchmarks/training.py --device cuda       # on a GPU (times are taken after torch.cuda.synchronize)
    python benchmarks/training.py --malloc 3          # SpadeModel.train with / without the allocator scope

``--malloc R`` measures only ``SpadeModel.train`` (Lightning, all experts per step), with and without
``spade_sc._malloc.keep_freed_memory`` (glibc's mmap / trim thresholds raised, as ``pp.image_features`` does around
its encoder loop) around it: each in a fresh process, the two interleaved over R rounds, wall and CPU time (all
threads) of the call, pairs/s and peak resident memory. The experts' alignment after training
(``align_experts=False``) is left out: it is not the Lightning loop.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16, help="K")
    p.add_argument("--pairs", type=int, default=2048, help="pairs per expert")
    p.add_argument("--image-dim", type=int, default=1280)
    p.add_argument("--gene-dim", type=int, default=200)
    p.add_argument("--proj-dim", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=2, help="rounds; the best time of each method is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-single", action="store_true", help="skip the batched 1-expert-per-step loop")
    p.add_argument("--no-lightning", action="store_true", help="skip SpadeModel.train")
    p.add_argument("--quick", action="store_true", help="512 pairs per expert, batch 128")
    p.add_argument("--device", default="cpu", help="torch device of the plain loops (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--malloc",
        type=int,
        default=0,
        metavar="R",
        help="only SpadeModel.train with / without the allocator scope, fresh processes, R interleaved rounds",
    )
    p.add_argument("--_malloc-child", dest="malloc_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def make_data(args: argparse.Namespace):
    """Synthetic pairs: image and gene vectors from a shared per-expert latent (so the loss can decrease)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    n = args.experts * args.pairs
    expert = torch.arange(args.experts).repeat_interleave(args.pairs)
    expert = expert[torch.randperm(n, generator=gen)]
    z = torch.randn(n, 16, generator=gen)
    image = z @ torch.randn(16, args.image_dim, generator=gen) + torch.randn(n, args.image_dim, generator=gen)
    gene = torch.relu(z @ torch.randn(16, args.gene_dim, generator=gen) + torch.randn(n, args.gene_dim, generator=gen))
    return image.contiguous().to(args.device), gene.contiguous().to(args.device), expert.to(args.device)


def sync(args) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.synchronize(args.device)
    return time.perf_counter()


def new_batched(args):
    from spade_sc.model import BatchedExperts

    model = BatchedExperts(args.experts, args.image_dim, args.gene_dim, args.proj_dim, seed=args.seed)
    return model.to(args.device).train()


def run_batched(args, image, gene, expert, experts_per_step):
    """Plain torch loop over the batched experts; returns (seconds, pairs seen, last-epoch mean loss, steps/epoch)."""
    import torch

    from spade_sc.model import ExpertBatchSampler, SoftCLIPLoss

    loss_fn = SoftCLIPLoss()
    sampler = ExpertBatchSampler(expert.cpu(), args.batch_size, seed=args.seed, experts_per_step=experts_per_step)

    def step(model, opt, idx):
        x, y, e = image[idx], gene[idx], expert[idx]
        i, g = model(x, y, e)
        loss = loss_fn(i, g, e)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach()), len(idx)

    warm = new_batched(args)  # warm-up on a throwaway copy, not timed
    step(warm, torch.optim.AdamW(warm.parameters(), lr=1e-4), torch.as_tensor(next(iter(sampler)), device=args.device))
    torch.manual_seed(args.seed)
    model = new_batched(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    seen, last = 0, 0.0
    t0 = sync(args)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = rows = 0
        for batch in sampler:
            loss, n = step(model, opt, torch.as_tensor(batch, device=args.device))
            total, rows = total + loss * n, rows + n
        seen += rows
        last = total / rows
    return sync(args) - t0, seen, last, len(sampler)


def run_sequential(args, image, gene, expert):
    """K separate (image head, gene head) pairs, each with its own AdamW, trained one after the other.

    Each expert starts from the same weights as the batched run (``BatchedExperts.head(k)``) and sees the same
    batches in the same order (its sub-batches of the all-experts steps), so the last-epoch losses are comparable.
    """
    import torch

    from spade_sc.model import ExpertBatchSampler, soft_clip_loss

    sampler = ExpertBatchSampler(expert.cpu(), args.batch_size, seed=args.seed, experts_per_step=None)
    schedule = {k: [[] for _ in range(args.epochs)] for k in range(args.experts)}  # expert -> epoch -> batches
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for step_batches in sampler.iter_steps():
            for b in step_batches:
                schedule[int(expert[b[0]])][epoch].append(torch.as_tensor(b, device=args.device))
    batched = new_batched(args)

    def step(heads, opt, idx):
        i, g = heads[0](image[idx]), heads[1](gene[idx])
        loss = soft_clip_loss(i, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach()), len(idx)

    warm = torch.nn.ModuleList(batched.head(0)).train()  # warm-up on a throwaway copy, not timed
    step(warm, torch.optim.AdamW(warm.parameters(), lr=1e-4), schedule[0][0][0])
    torch.manual_seed(args.seed)
    experts = []
    for k in range(args.experts):
        heads = torch.nn.ModuleList(batched.head(k)).train()
        experts.append((heads, torch.optim.AdamW(heads.parameters(), lr=1e-4, weight_decay=1e-2), schedule[k]))
    seen, last_total, last_rows = 0, 0.0, 0
    t0 = sync(args)
    for heads, opt, epochs in experts:
        for epoch, batches in enumerate(epochs):
            for idx in batches:
                loss, n = step(heads, opt, idx)
                seen += n
                if epoch == args.epochs - 1:
                    last_total, last_rows = last_total + loss * n, last_rows + n
    n_steps = sum(len(epochs[0]) for *_, epochs in experts)
    return sync(args) - t0, seen, last_total / last_rows, n_steps


def run_lightning(args, image, gene, expert, tune_malloc: bool | None = False, align: bool = True):
    """SpadeModel.train (Lightning) with all experts per step (inside the allocator scope with ``tune_malloc``; the
    experts' alignment after training with ``align``)."""
    import logging

    import numpy as np
    import torch

    from spade_sc.model import DataExperts, SpadeModel

    logging.getLogger("lightning").setLevel(logging.ERROR)
    k = args.experts
    data_experts = DataExperts(
        centroids=np.zeros((k, args.image_dim), dtype=np.float32),
        centroid_tissue=np.array(["all"] * k),
        centroid_expert=np.arange(k),
        n_experts=k,
    )
    model = SpadeModel(
        data_experts,
        [f"g{i}" for i in range(args.gene_dim)],
        args.image_dim,
        features_key="X_bench",
        proj_dim=args.proj_dim,
        seed=args.seed,
    )
    from spade_sc._malloc import keep_freed_memory

    pairs = {"all": (image.cpu().numpy(), gene.cpu().numpy(), expert.cpu().numpy())}
    t0 = time.perf_counter()
    with keep_freed_memory(tune_malloc):
        model.train(
            pairs,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            progress=False,
            experts_per_step=None,
            align_experts=align,
            trainer_kwargs={"accelerator": "gpu" if args.device.startswith("cuda") else "cpu"},
        )
    seconds = time.perf_counter() - t0
    torch.use_deterministic_algorithms(False)  # SpadeModel.train runs Lightning with deterministic=True (global)
    return seconds, args.epochs * len(expert), model.history_[-1]["train_loss"], None


def malloc_child(args: argparse.Namespace) -> dict:
    """SpadeModel.train in this (fresh) process, with (``on``) or without (``off``) the allocator scope."""
    import resource

    import torch

    image, gene, expert = make_data(args)
    c0 = time.process_time()
    tune = args.malloc_child == "on"
    seconds, seen, loss, _ = run_lightning(args, image, gene, expert, tune_malloc=tune, align=False)
    cpu = time.process_time() - c0
    return {
        "malloc": args.malloc_child,
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "pairs_per_s": round(seen / seconds),
        "last_loss": round(float(loss), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
    }


def malloc_compare(args: argparse.Namespace) -> None:
    """``--malloc R``: with / without the allocator scope, each in a fresh process, interleaved over R rounds."""
    import os

    import numpy as np

    keep = ["--experts", args.experts, "--pairs", args.pairs, "--image-dim", args.image_dim, "--gene-dim"]
    keep += [args.gene_dim, "--proj-dim", args.proj_dim, "--batch-size", args.batch_size, "--epochs", args.epochs]
    keep += ["--threads", args.threads, "--seed", args.seed, "--device", args.device]
    print(
        f"SpadeModel.train with / without the allocator scope: K={args.experts} x {args.pairs} pairs, batch "
        f"{args.batch_size}, {args.epochs} epoch(s), {args.threads} thread(s), load {os.getloadavg()[0]:.1f}"
    )
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.malloc):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            cmd = [sys.executable, __file__, "--_malloc-child", mode, *map(str, keep)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            info = json.loads(res.stdout.strip().splitlines()[-1])
            runs[mode].append(info)
            print(f"  round {r + 1}: {info}", flush=True)
    for key in ("cpu_s", "seconds"):
        ratios = [a[key] / b[key] for a, b in zip(runs["off"], runs["on"], strict=True)]
        print(f"off / on, {key} per round: {', '.join(f'{x:.2f}' for x in ratios)} (median {np.median(ratios):.2f})")
    print(
        f"peak RSS MB: off {max(i['peak_rss_mb'] for i in runs['off'])}, on {max(i['peak_rss_mb'] for i in runs['on'])}"
    )
    print(f"load at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    args = parse()
    if args.quick:
        args.pairs, args.batch_size = 512, 128
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.malloc_child is not None:
        print(json.dumps(malloc_child(args)))
        return
    if args.malloc:
        malloc_compare(args)
        return
    image, gene, expert = make_data(args)
    print(
        f"P3 training throughput: K={args.experts} experts x {args.pairs} pairs, {args.image_dim}-d image features, "
        f"{args.gene_dim} genes, proj {args.proj_dim}, batch {args.batch_size} per expert, {args.epochs} epoch(s), "
        f"soft_clip + AdamW, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}"
    )
    results = {}
    runs = [
        ("batched, all experts/step", lambda: run_batched(args, image, gene, expert, None)),
        ("sequential, K loops", lambda: run_sequential(args, image, gene, expert)),
    ]
    if not args.no_single:
        runs.append(("batched, 1 expert/step", lambda: run_batched(args, image, gene, expert, 1)))
    if not args.no_lightning:
        runs.append(("Lightning SpadeModel.train", lambda: run_lightning(args, image, gene, expert)))
    best: dict[str, tuple] = {}
    for r in range(args.repeats):
        for name, fn in runs if r % 2 == 0 else runs[::-1]:
            out = fn()
            print(f"  round {r + 1}: {name:<28} {out[0]:7.2f} s  {out[1] / out[0]:8.0f} pairs/s", flush=True)
            if name not in best or out[0] < best[name][0]:
                best[name] = out
    print(f"{'method (best of rounds)':<28} {'steps/epoch':>11} {'seconds':>9} {'pairs/s':>10} {'last-epoch loss':>16}")
    for name, _ in runs:
        seconds, seen, loss, n_steps = best[name]
        results[name] = seen / seconds
        steps = "-" if n_steps is None else str(n_steps)
        print(f"{name:<28} {steps:>11} {seconds:>9.2f} {results[name]:>10.0f} {loss:>16.4f}")
    base = results["sequential, K loops"]
    top = results["batched, all experts/step"]
    print(f"ratio batched all-experts/step / sequential K loops: {top / base:.2f}x (goal >= 3x)")
    if "batched, 1 expert/step" in results:
        print(f"ratio batched all-experts/step / batched 1-expert/step: {top / results['batched, 1 expert/step']:.2f}x")
        print(f"ratio batched 1-expert/step / sequential K loops: {results['batched, 1 expert/step'] / base:.2f}x")
    if "Lightning SpadeModel.train" in results:
        lightning = results["Lightning SpadeModel.train"]
        print(f"ratio Lightning SpadeModel.train / sequential K loops: {lightning / base:.2f}x")


if __name__ == "__main__":
    main()
