#!/usr/bin/env python3
"""Data-parallel scaling model: predicted step time and scaling efficiency for 8-256 GPUs, with
and without overlap of the gradient all-reduce with backward. docs/PERFORMANCE.md ("Scaling
model") states the assumptions and where every input comes from.

  bench/scaling_model.py                       # the scenarios of docs/PERFORMANCE.md
  bench/scaling_model.py --step-ms 55 --grad-mb 74.1 --intra-gbs 470 --inter-gbs 420

Model (weak scaling: fixed batch per GPU, so ideal step time is the 1-GPU step time):
- compute: the measured 1-GPU step time T splits into forward (fwd_frac), backward (bwd_frac)
  and the rest (optimizer, host work); only the all-reduce is added by data parallelism.
- all-reduce of S bytes over N ranks: t(S) = alpha(N) + S * 2(N-1)/N / busbw(N) (the nccl-tests
  definition of bus bandwidth, so published busbw figures plug in directly). busbw(N) is the
  NVLink figure within one node (N <= gpus_per_node) and the InfiniBand figure across nodes;
  alpha(N) = alpha0 + alpha_hop * log2(N) (tree/NVLS latency; ring latency grows with N and is
  worse).
- buckets: gradients are reduced in buckets of bucket_mb (PyTorch DDP's default is 25 MB),
  one at a time on one communication stream. Without overlap (what our worker does today) every
  bucket starts after backward: exposed = sum of t(bucket). With overlap, backward produces
  gradients at a uniform rate and bucket k can start once its last gradient exists and the
  previous bucket is done: exposed = finish of the last bucket - end of backward.
- jitter (optional, --jitter-pct): each GPU's compute time varies independently with standard
  deviation jitter_pct of the step; a synchronous step waits for the slowest of N, about
  sigma * sqrt(2 ln N) longer than the mean (the expected maximum of N normal variables).
- not modelled: communication kernels slowing the backward they overlap with (NCCL takes SMs and
  memory bandwidth), input-pipeline limits, network congestion from other jobs, and the
  optimizer's share shrinking with fused kernels.
"""
import argparse
import math

GPUS = [1, 8, 16, 32, 64, 128, 256, 512]


def allreduce_s(size_bytes, n, a):
    if n == 1:
        return 0.0
    busbw = (a.intra_gbs if n <= a.gpus_per_node else a.inter_gbs) * 1e9
    alpha = (a.alpha0_us + a.alpha_hop_us * math.log2(n)) * 1e-6
    return alpha + size_bytes * 2 * (n - 1) / n / busbw


def exposed_comm_s(n, a, overlap):
    grad = a.grad_mb * 1e6
    bucket = a.bucket_mb * 1e6
    sizes = [bucket] * int(grad // bucket) + ([grad % bucket] if grad % bucket else [])
    t_bwd = a.step_ms * 1e-3 * a.bwd_frac
    if not overlap:
        return sum(allreduce_s(s, n, a) for s in sizes)
    done, produced, finish = 0.0, 0.0, 0.0
    for s in sizes:
        produced += s
        ready = t_bwd * produced / grad
        finish = max(ready, finish) + allreduce_s(s, n, a)
        done += s
    return max(finish - t_bwd, 0.0)


def wait_for_slowest_ms(n, a):
    return a.step_ms * a.jitter_pct / 100 * math.sqrt(2 * math.log(n)) if n > 1 else 0.0


def table(a, title):
    t1 = a.step_ms
    print(f"\n{title}")
    print(f"step {t1:g} ms on 1 GPU, gradients {a.grad_mb:g} MB, buckets {a.bucket_mb:g} MB, busbw "
          f"{a.intra_gbs:g} GB/s within a node of {a.gpus_per_node}, {a.inter_gbs:g} GB/s across nodes, "
          f"latency {a.alpha0_us:g} + {a.alpha_hop_us:g} log2(N) us, jitter {a.jitter_pct:g}%")
    print("| GPUs | all-reduce of all gradients, ms | step, no overlap, ms | efficiency | step, overlap, ms | efficiency |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in GPUS:
        whole = allreduce_s(a.grad_mb * 1e6, n, a) * 1e3
        slowest = wait_for_slowest_ms(n, a)
        no = t1 + slowest + exposed_comm_s(n, a, False) * 1e3
        ov = t1 + slowest + exposed_comm_s(n, a, True) * 1e3
        print(f"| {n} | {whole:.2f} | {no:.1f} | {t1 / no:.0%} | {ov:.1f} | {t1 / ov:.0%} |")


SCENARIOS = [
    # (title, overrides)
    ("A. Our ResNet-18-width model (bench/gpu.toml, FPN 256) as it runs today on one H100: "
     "55 ms per step at batch 64 (about 1,150 images/s, docs/PERFORMANCE.md); NCCL busbw as published "
     "for H100 (NVLink 470 GB/s, NVLink + NDR InfiniBand 420 GB/s at large messages)",
     dict(step_ms=55.0, grad_mb=74.1)),
    ("B. The same model with the step issue 10 aims for (torch.compile-class, assumed 12 ms at batch 64)",
     dict(step_ms=12.0, grad_mb=74.1)),
    ("C. B with a realistic bus bandwidth for 25 MB buckets (not the 8 GB peak): 150 GB/s within a node, "
     "100 GB/s across nodes",
     dict(step_ms=12.0, grad_mb=74.1, intra_gbs=150.0, inter_gbs=100.0)),
    ("D. Our TCP ring instead of NCCL (our measured loopback bus bandwidth, about 2 GB/s, "
     "bench/ring_bandwidth.sh), today's 55 ms step",
     dict(step_ms=55.0, grad_mb=74.1, intra_gbs=2.0, inter_gbs=2.0, alpha0_us=200.0, alpha_hop_us=100.0)),
    ("E. C with 2% step-time jitter per GPU (stragglers)",
     dict(step_ms=12.0, grad_mb=74.1, intra_gbs=150.0, inter_gbs=100.0, jitter_pct=2.0)),
    ("F. Check against Horovod's published 512-GPU result (ResNet-101, 44.5 M parameters = 178 MB, batch 64, "
     "4 Pascal GPUs per server, 25 Gbit/s RoCE: busbw taken as the NIC's 3.1 GB/s across servers, 10 GB/s "
     "(PCIe) within one; step 556 ms = 64 images at 115 images/s, from the 1,657 images/s on 16 GPUs in "
     "Horovod's benchmark docs; 2% jitter). Horovod reports 90% at 512 GPUs",
     dict(step_ms=556.0, grad_mb=178.2, gpus_per_node=4, intra_gbs=10.0, inter_gbs=3.1, alpha0_us=50.0,
          alpha_hop_us=20.0, jitter_pct=2.0, bucket_mb=64.0)),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, help="measured 1-GPU step time (ms)")
    ap.add_argument("--grad-mb", type=float, help="gradient bytes per step (MB, 1e6)")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--intra-gbs", type=float, default=470.0, help="busbw within a node (GB/s)")
    ap.add_argument("--inter-gbs", type=float, default=420.0, help="busbw across nodes (GB/s)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--alpha0-us", type=float, default=15.0, help="all-reduce latency, fixed part")
    ap.add_argument("--alpha-hop-us", type=float, default=5.0, help="all-reduce latency per log2(N)")
    ap.add_argument("--jitter-pct", type=float, default=0.0, help="per-GPU step-time standard deviation, "
                    "% of the step")
    ap.add_argument("--fwd-frac", type=float, default=0.3, help="forward's share of the step (not used "
                    "beyond documentation: only backward can hide communication)")
    ap.add_argument("--bwd-frac", type=float, default=0.6, help="backward's share of the step")
    a = ap.parse_args()
    if a.step_ms is not None or a.grad_mb is not None:
        if a.step_ms is None or a.grad_mb is None:
            raise SystemExit("give both --step-ms and --grad-mb (or neither for the documented scenarios)")
        table(a, "Custom")
        return
    defaults = vars(a).copy()
    for title, overrides in SCENARIOS:
        table(argparse.Namespace(**{**defaults, **overrides}), title)


if __name__ == "__main__":
    main()
