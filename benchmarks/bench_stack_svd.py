"""svd stacking of two rank-16 adapters on 4096×4096 and 4096×11008 modules.

loratools: QR of the stacked factors, SVD of the small core (``ops.algebra.factorize_lowrank``),
never forming the 4096×11008 matrix. Reference: what PEFT's ``add_weighted_adapter(...,
combination_type="svd")`` does — form ΔW = Σ wᵢ sᵢ BᵢAᵢ densely and run ``torch.linalg.svd`` on
it (float32), then truncate. Both results are compared with the Eckart–Young bound.

    python benchmarks/bench_stack_svd.py [--repeat 3] [--rank 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from loratools.ops.algebra import concat, factorize_lowrank


def dense_svd(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    M = B @ A  # what PEFT does: the full delta, then a full SVD
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; two rank-16 adapters, target rank {args.rank}")
    print(f"{'module':>12} {'loratools s':>12} {'dense svd s':>12} {'ratio':>7} {'loratools err':>14} {'dense err':>10} "
          f"{'E-Y bound':>10}")
    for out_f, in_f in ((4096, 4096), (4096, 11008)):
        terms = [(torch.randn(out_f, 16) * 0.01, torch.randn(16, in_f) / in_f**0.5, w) for w in (1.0, 0.5)]
        B, A = concat(terms)
        t_ours, t_dense = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            f = factorize_lowrank(B, A, rank=args.rank, dtype=torch.float32)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            Bd, Ad = dense_svd(B, A, args.rank)
            t_dense.append(time.perf_counter() - t)
        M = (B.double() @ A.double())
        s = torch.linalg.svdvals(M)
        bound = float(torch.sqrt((s[args.rank:] ** 2).sum()))
        err_ours = float(torch.linalg.matrix_norm(M - f.B.double() @ f.A.double()))
        err_dense = float(torch.linalg.matrix_norm(M - Bd.double() @ Ad.double()))
        a, d = min(t_ours), min(t_dense)
        print(f"{out_f}x{in_f:>6} {a:12.4f} {d:12.3f} {d / a:6.0f}x {err_ours:14.6e} {err_dense:10.3e} {bound:10.3e}")


if __name__ == "__main__":
    main()
