"""Issue 17, direction 1 and 2 measured before building them: producer-side compaction and an atomic reduction.

    python benchmarks/exp_compact.py    # ≈1 min on an H200; writes $OUT/exp_compact.json (results/exp_compact_h200.json)

The launch rule's kernel does, in every program: load its slice of x, test it, list the kept rows (prefix sum,
stored and read back), gather x at those rows, stream the rows' weights, then the split-K tail (partials stored,
a counter bumped, the last arriver sums them). Here the kept-row list and the kept values ``x'`` come
precomputed (what the kernel producing x — RMSNorm, SiLU·up, attention — would write), so a GEMV program
only loads its equal share of the list and streams those rows: work is balanced at any sparsity.

Columns, graph-timed per call (µs), bf16, plain ``[K, N]`` layout, the rule's 64×256 tiles:
``rule`` the library kernel; ``pre`` the precompacted GEMV with the same deterministic tail; ``pre_atomic``
the precompacted GEMV adding fp32 partials with atomics into a buffer zeroed before each call (memset in the
graph; not deterministic); ``pre_atomic_nozero`` the same without the memset (a floor; its results are wrong);
``compact`` a standalone kernel producing the list from x (one program; fused into a producer it would cost
less); ``dense`` F.linear. Every variant is checked against the torch reference first.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case, env_info, graph_time_us  # noqa: E402

from actsparse.kernels import sparse_gemv_reference  # noqa: E402
from actsparse.kernels import triton_gemv as tg  # noqa: E402
from actsparse.kernels.triton_gemv import _accumulate, split_k_tail  # noqa: E402
from actsparse.kernels.triton_round import round_nearest_even  # noqa: E402

SHAPES = [(4096, 12288), (4096, 22016), (4096, 4096), (11008, 4096), (14336, 4096)]
BLOCK_K, BLOCK_N, STAGES, PER_SM = 64, 256, 3, 2


@triton.jit
def _compact_kernel(x_ptr, tau_ptr, idx_ptr, xv_ptr, cnt_ptr, K, K_P2: tl.constexpr):
    offs = tl.arange(0, K_P2)
    x = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
    tau = round_nearest_even(tl.load(tau_ptr), x_ptr.dtype.element_ty)
    keep = (offs < K) & ~(tl.abs(x.to(tl.float32)) <= tau)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + pos, offs, mask=keep)
    tl.store(xv_ptr + pos, x, mask=keep)
    tl.store(cnt_ptr, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def _precompacted_kernel(
    idx_ptr,
    xv_ptr,
    cnt_ptr,
    w_ptr,
    y_ptr,
    part_ptr,
    sem_ptr,
    N,
    SPLIT_K: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = w_ptr + offs_n
    X_DTYPE: tl.constexpr = xv_ptr.dtype.element_ty
    MMA_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    row0 = (tl.arange(0, 16) == 0).to(MMA_DTYPE)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    xacc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    count = tl.load(cnt_ptr)
    per = tl.cdiv(tl.cdiv(count, SPLIT_K), BLOCK_K) * BLOCK_K  # equal shares of the kept rows
    lo = pid_k * per
    hi = tl.minimum(lo + per, count)
    for i in range(lo, hi, BLOCK_K):
        r = i + tl.arange(0, BLOCK_K)
        valid = r < hi
        rows = tl.load(idx_ptr + r, mask=valid, other=0)
        xs = tl.load(xv_ptr + r, mask=valid, other=0.0).to(tl.float32)
        acc, xacc = _accumulate(
            acc, xacc, xs, rows, valid, w_cols, N, row0, X_DTYPE, MMA_DTYPE, 0, True, INTERPRET, False, INTERPRET
        )
    part = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(part_ptr + offs_n, part, sem="relaxed")
    else:
        total, last = split_k_tail(part, pid_k, pid_n, offs_n, N, part_ptr, sem_ptr, SPLIT_K, SPLIT_P2)
        if last:
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty))


class Compacted:
    """The precomputed list for one input: kept rows, their values, their count (device tensors)."""

    def __init__(self, x: torch.Tensor, tau: torch.Tensor):
        k = x.numel()
        self.x, self.tau, self.k = x, tau, k
        self.idx = torch.zeros(k, dtype=torch.int32, device=x.device)
        self.xv = torch.zeros(k, dtype=x.dtype, device=x.device)
        self.cnt = torch.zeros(1, dtype=torch.int32, device=x.device)

    def produce(self):
        _compact_kernel[(1,)](
            self.x, self.tau, self.idx, self.xv, self.cnt, self.k, K_P2=triton.next_power_of_2(self.k), num_warps=16
        )


def split_for(n: int) -> int:
    return max(1, PER_SM * torch.cuda.get_device_properties(0).multi_processor_count // (n // BLOCK_N))


def precompacted(c: Compacted, w: torch.Tensor, split: int, atomic: bool, zero: bool, y, part, sem):
    n = w.shape[1]
    if atomic and zero:
        part.zero_()
    _precompacted_kernel[(n // BLOCK_N, split)](
        c.idx,
        c.xv,
        c.cnt,
        w,
        y,
        part,
        sem,
        n,
        SPLIT_K=split,
        SPLIT_P2=triton.next_power_of_2(split),
        BLOCK_K=BLOCK_K,
        BLOCK_N=BLOCK_N,
        ATOMIC=atomic,
        INTERPRET=tg.interpreting(),
        num_warps=4,
        num_stages=STAGES,
    )
    return part[:n] if atomic else y


def shape_row(k: int, n: int) -> dict:
    case = Case(k, n, torch.bfloat16, layout=None)
    split = split_for(n)
    comps = [Compacted(x, p.threshold) for x, p in zip(case.x, case.packed)]
    bufs = [
        (
            torch.empty(n, dtype=torch.bfloat16, device="cuda"),
            torch.zeros(split * n, dtype=torch.float32, device="cuda"),
            torch.zeros(n // BLOCK_N, dtype=torch.int32, device="cuda"),
        )
        for _ in comps
    ]
    m = case.copies

    def run(i, atomic, zero):
        p = case.packed[i % m]
        return precompacted(comps[i % m], p.weight_t, split, atomic, zero, *bufs[i % m])

    case.set_sparsity(0.5)
    for c in comps:
        c.produce()
    ref = sparse_gemv_reference(case.x[0], case.packed[0]).double()
    for atomic in (False, True):
        got = run(0, atomic, True).double()
        err = ((got[: ref.numel()] - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (k, n, atomic, err)
    row = {"k": k, "n": n, "split_pre": split, "rule": str(tg.launch_config(case.packed[0], torch.device("cuda")))}
    row["dense"] = case.time_dense()
    for s in (1.0, 0.7, 0.5, 0.0):
        case.set_sparsity(s)
        for c in comps:
            c.produce()
        calls = 4 * m
        row[f"rule@{s}"] = case.time_sparse()
        row[f"pre@{s}"] = graph_time_us(lambda i: run(i, False, True), calls)
        row[f"pre_atomic@{s}"] = graph_time_us(lambda i: run(i, True, True), calls)
        row[f"pre_atomic_nozero@{s}"] = graph_time_us(lambda i: run(i, True, False), calls)
        row[f"compact@{s}"] = graph_time_us(lambda i: comps[i % m].produce(), calls)
    return row


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("exp_compact needs a CUDA GPU")
    rows = []
    for k, n in SHAPES:
        row = shape_row(k, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = f"{'K x N':>13} {'s':>4} {'dense':>7} {'rule':>7} {'pre':>7} {'atomic':>7} {'no-zero':>7} {'compact':>7}"
    print(head)
    for r in rows:
        for s in (1.0, 0.7, 0.5, 0.0):
            print(
                f"{r['k']:>6}x{r['n']:<6} {s:>4} {r['dense']:7.2f} {r[f'rule@{s}']:7.2f} {r[f'pre@{s}']:7.2f} "
                f"{r[f'pre_atomic@{s}']:7.2f} {r[f'pre_atomic_nozero@{s}']:7.2f} {r[f'compact@{s}']:7.2f}"
            )
    gemm = masked_gemm_rows()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "exp_compact.json"), "w") as f:
        json.dump(
            {"env": env_info(), "rows": rows, "tiles": [BLOCK_K, BLOCK_N, STAGES, PER_SM], "masked_gemm": gemm},
            f,
            indent=1,
        )


def _time_mm(ws: list[torch.Tensor], xs: list[torch.Tensor], linear: bool = False) -> float:
    if linear:  # F.linear(x, W[N, K]): the dense baseline's call
        return graph_time_us(lambda i: F.linear(xs[i % len(ws)], ws[i % len(ws)]), 4 * len(ws))
    return graph_time_us(lambda i: xs[i % len(ws)] @ ws[i % len(ws)], 4 * len(ws))


def masked_gemm_rows() -> list[dict]:
    """The dense route of a fused group runs ``[S, K] @ [K, N]`` (row i masked by layer i): is S = 2 or 3 rows
    slower than the plain fused GEMV (S = 1) the dense baseline runs? (Llama-2 at 0%: x0.969 of fused dense.)"""
    res = []
    for k, n in ((4096, 12288), (4096, 22016)):
        copies = 8
        ws = [torch.randn(k, n, dtype=torch.bfloat16, device="cuda") / math.sqrt(k) for _ in range(copies)]
        row = {"k": k, "n": n}
        for rows_ in (1, 2, 3):
            row[f"rows{rows_}"] = _time_mm(ws, [torch.randn(rows_, k, dtype=torch.bfloat16, device="cuda") for _ in ws])
        wt = [w.t().contiguous() for w in ws]
        x1 = [torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for _ in ws]
        row["linear1"] = _time_mm(wt, x1, linear=True)
        print(json.dumps(row), flush=True)
        res.append(row)
    return res


if __name__ == "__main__":
    main()
