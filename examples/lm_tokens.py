"""Next-token metrics for a tiny language model with a 32k vocabulary: [B, T, V] logits as they are.

    python examples/lm_tokens.py [--steps 30] [--vocab 32000] [--device cpu|cuda]

Sequences follow a hidden successor rule over a few hundred of the vocabulary's tokens and are
padded to a fixed length with -100 (Hugging Face's label padding). stepscope reads the logits
with ``class_dim=-1`` (a view: no permute copy of the largest tensor of the step), skips the
padding with ``ignore_index=-100``, and calling the metric returns the step's own numbers
(loss, perplexity, top-1/top-5) while it accumulates the run's. No C x C matrix is kept for
V > 1024, so the state is O(V): printed at the end.
"""

import argparse
import math
import time

import torch

import stepscope

PAD = -100


def batch(B: int, T: int, succ: torch.Tensor, tokens: torch.Tensor, g: torch.Generator) -> tuple:
    start = tokens[torch.randint(0, len(tokens), (B,), generator=g)]
    seq = torch.empty(B, T + 1, dtype=torch.long)
    seq[:, 0] = start
    for t in range(T):
        seq[:, t + 1] = succ[seq[:, t]]
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    pad = torch.arange(T).view(1, T) >= lengths.view(B, 1)
    y[pad] = PAD
    x[pad] = 0
    return x, y


class TinyLM(torch.nn.Module):
    def __init__(self, V: int, d: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(V, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))  # [B, T, V]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    V = args.vocab
    tokens = torch.randperm(V, generator=g)[:256]  # the tokens in use
    succ = torch.zeros(V, dtype=torch.long)
    succ[tokens] = tokens[torch.randperm(len(tokens), generator=g)]

    model = TinyLM(V).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    metrics = stepscope.ClassificationMetrics("multiclass", num_classes=V, top_k=(1, 5), ignore_index=PAD,
                                              class_dim=-1).to(dev)
    print(f"{'step':>4} {'loss':>7} {'ppl':>9} {'top1':>6} {'top5':>6} {'tokens':>6}")
    t0 = time.perf_counter()
    first = last = None
    with stepscope.Monitor(model, opt) as mon:
        for step in range(args.steps):
            x, y = (t.to(dev) for t in batch(args.batch_size, args.seq_len, succ, tokens, g))
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=PAD)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            m = metrics(logits.detach(), y)  # this step's numbers; the run's accumulate
            if step % 5 == 0 or step == args.steps - 1:
                # printing reads the device: only on the printed steps
                lm = float(m["loss"])
                print(f"{step:4d} {lm:7.3f} {math.exp(lm):9.1f} {float(m['accuracy']):6.3f} "
                      f"{float(m['top5_accuracy']):6.3f} {int(m['samples']):6d}")
                first = lm if first is None else first
                last = lm
    run = metrics.compute()
    print(f"run: loss {float(run['loss']):.3f}, perplexity {math.exp(float(run['loss'])):.1f}, "
          f"top-1 {float(run['accuracy']):.3f}, top-5 {float(run['top5_accuracy']):.3f}, "
          f"{int(run['samples'])} tokens, {int(run['ignored'])} padding ignored")
    print(f"metric state: {metrics.state.numel()} float64 values for V = {V} (O(V): no V x V matrix)")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.2f} s")
    print(mon.summary())
    if not last < first:
        raise SystemExit(f"the loss did not go down ({first:.3f} -> {last:.3f}): something is wrong")


if __name__ == "__main__":
    main()
