"""Benchmark: the CPU fp32 matrix products of one SmolLM2 decoding step, by each kernel the python runtime could use.

    python benchmarks/cpu_matmul.py [--threads 2] [--repeat 4]

The 120 weight matrices of SmolLM2-135M's 30 layers (qkv [576, 960], output [576, 576], gate|up [576, 3072], down
[1536, 576]; 425 MB in fp32, far larger than any cache, so every step reads them from memory as decoding does),
random values, multiplied in layer order by x of 1, 2, 8 and 64 rows; the best of --repeat passes. Kernels:

- torch.mm(x, W[in, out])                     the baseline (MKL's sgemm in torch's CPU build)
- oneDNN inner product, W[out, in] as it is   ft_gpt._linear for 2 rows and more
- oneDNN inner product, W packed for it       (a second copy of the weights; not used)
- numpy W[out, in] @ x.T                      ft_gpt._linear for one row (numpy's BLAS: sgemv)

Also the read bandwidth of a sum over 1 GiB, for scale.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the served model's default
    import torch

    torch.set_num_threads(args.threads)
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30
    dense = [torch.randn(n_in, n_out) for n_in, n_out in shapes]          # [in, out]
    rows = [w.t().contiguous() for w in dense]                            # [out, in]
    arrays = [w.numpy() for w in rows]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in rows]
    megabytes = sum(w.numel() * 4 for w in dense) / 1e6

    kernels = {
        "torch.mm (baseline)": lambda k, x: torch.mm(x, dense[k]),
        "oneDNN, [out, in]": lambda k, x: torch.ops.mkldnn._linear_pointwise(x, rows[k], None, "none", [], ""),
        "oneDNN, packed": lambda k, x: torch.ops.mkldnn._linear_pointwise(x, packed[k], None, "none", [], ""),
        "numpy BLAS": lambda k, x: torch.from_numpy(arrays[k] @ x.numpy().T),
    }

    def best(kernel, m):
        inputs = {n_in: torch.randn(m, n_in) for n_in, _ in shapes}
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            for k, (n_in, _) in enumerate(shapes):
                kernel(k, inputs[n_in])
            times.append(time.perf_counter() - started)
        return min(times)

    data = torch.ones(256 * 2**20)
    data.sum()
    sums = []
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        sums.append(time.perf_counter() - started)
    print(f"{len(shapes)} matrices, {megabytes:.0f} MB fp32; {args.threads} threads; read bandwidth (sum over 1 GiB) "
          f"{data.numel() * 4 / min(sums) / 1e9:.1f} GB/s; ms per pass (GB/s of weights read), best of {args.repeat}")
    print(f"{'rows':>4}  " + "  ".join(f"{name:>22}" for name in kernels))
    for m in (1, 2, 8, 64):
        cells = []
        for kernel in kernels.values():
            seconds = best(kernel, m)
            cells.append(f"{seconds * 1e3:8.2f} ms ({megabytes / seconds / 1e3:4.1f} GB/s)")
        print(f"{m:>4}  " + "  ".join(f"{cell:>22}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
