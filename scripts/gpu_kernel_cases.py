"""Runs the metrics update once through every CUDA kernel path, for tools that watch kernels:
compute-sanitizer (`--small`: small shapes, every path and input kind, binary and multilabel
too) and Nsight Compute (`--ncu`: the bandwidth-target shapes at 2^26 elements, one update each).

    compute-sanitizer --tool memcheck python scripts/gpu_kernel_cases.py --small
    ncu --clock-control none -k regex:mc_ python scripts/gpu_kernel_cases.py --ncu
"""

import argparse

import torch

import stepscope


def small_cases(g):
    yield "tile C=10", torch.randn(3000, 10, generator=g)
    yield "tile C=100 bf16", torch.randn(700, 100, generator=g).bfloat16()
    yield "tile chlast seg", torch.randn(2, 21, 8, 12, generator=g).contiguous(memory_format=torch.channels_last)
    yield "row C=3000 fp16", torch.randn(40, 3000, generator=g).half()
    yield "row unaligned", torch.randn(30, 3002, generator=g)[:, 1:]
    yield "strided seg", torch.randn(2, 21, 8, 12, generator=g)
    yield "strided transposed", torch.randn(37, 500, generator=g).t()


def ncu_cases(g):
    total = 1 << 26
    for C, dt in ((10, torch.float32), (1000, torch.float32), (1000, torch.bfloat16), (32000, torch.bfloat16)):
        yield f"C={C} {dt}", torch.randn(total // C, C, generator=g).to(dt)
    yield "seg C=21 NCHW", torch.randn(total // (21 * 128 * 256), 21, 128, 256, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--ncu", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    cases = list(small_cases(g) if args.small else ncu_cases(g))
    inputs = ("auto", "logits", "probs") if args.small else ("auto",)
    for name, x in cases:
        C = x.shape[1]
        t = torch.randint(-1, C, (x.shape[0],) + tuple(x.shape[2:]), generator=g)
        x, t = x.cuda(), t.cuda()
        for inp in inputs:
            for data in ((x, x.float().softmax(1).to(x.dtype)) if args.small else (x,)):
                m = stepscope.ClassificationMetrics("multiclass", num_classes=C, top_k=(1, 3), ignore_index=-1,
                                                    input=inp, confusion_matrix=C <= 1024, device="cuda")
                m.update(data, t)
        torch.cuda.synchronize()
        print(name, "ok", flush=True)
    if args.small:
        for task, kw in (("binary", {}), ("multilabel", {"num_labels": 5})):
            for inp in ("auto", "logits", "probs"):
                m = stepscope.ClassificationMetrics(task, input=inp, device="cuda", **kw)
                shape = (300,) if task == "binary" else (300, 5)
                x = torch.rand(shape, generator=g) if inp == "probs" else torch.randn(shape, generator=g)
                m.update(x.cuda(), torch.randint(0, 2, shape, generator=g).cuda())
        torch.cuda.synchronize()
        print("binary/multilabel ok")


if __name__ == "__main__":
    main()
