"""A dispatch mode that records every op reaching Python dispatch: what an update costs in ops
(one custom op and nothing after it means no extra launch and no host read from Python)."""

from torch.utils._python_dispatch import TorchDispatchMode


class SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
