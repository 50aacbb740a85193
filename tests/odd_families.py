"""Model families of the kinds users bring and the built-in ones do not have, each a class with
the family interface, named by import path (``tests.odd_families:DeadHead``):

`DeadHead`: every block has a Linear its forward never calls, and the root a head that is never
used (parameters without gradients, units whose forward never runs). `TiedBlocks`: the first and
the last block share one Linear weight (a tie between two blocks, not an embedding and a head).
`FunctionalChild`: a child whose parameters its parent reads directly, never calling its
forward, as `nn.MultiheadAttention` does with `out_proj`. `RootArg`: a root parameter passed
into every block as an argument.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Family:
    DEFAULTS = dict(width=4, n_blocks=2)

    @staticmethod
    def check(kw: dict) -> None:
        if kw["width"] < 1 or kw["n_blocks"] < 1:
            raise ValueError(f"width and n_blocks must be >= 1, got {kw}")

    @staticmethod
    def blocks(model):
        return list(model.blocks)

    @staticmethod
    def make_batch(kw: dict, n: int, gen: torch.Generator):
        return torch.randn(n, kw["width"], generator=gen), torch.randn(n, 1, generator=gen)

    @staticmethod
    def loss(model, batch):
        x, y = batch
        return F.mse_loss(model(x).float(), y)


class _Stack(nn.Module):
    """The blocks in order, then a linear head to one output."""
    def __init__(self, blocks, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _DeadBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.dead = nn.Linear(d, d)   # never called

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class DeadHead(_Family):
    @staticmethod
    def build(width: int, n_blocks: int):
        model = _Stack([_DeadBlock(width) for _ in range(n_blocks)], width)
        model.dead_head = nn.Linear(width, 1)   # never used
        return model


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class TiedBlocks(_Family):
    @staticmethod
    def build(width: int, n_blocks: int):
        model = _Stack([_Block(width) for _ in range(max(n_blocks, 2))], width)
        model.blocks[-1].fc.weight = model.blocks[0].fc.weight
        return model


class _Reads(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)   # its forward never runs: its weight is read here

    def forward(self, x):
        return x + F.linear(torch.tanh(self.fc(x)), self.proj.weight, self.proj.bias)


class FunctionalChild(_Family):
    @staticmethod
    def build(width: int, n_blocks: int):
        return _Stack([_Reads(width) for _ in range(n_blocks)], width)


class _AlphaBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, alpha):
        return x + alpha * torch.tanh(self.fc(x))


class _AlphaNet(nn.Module):
    def __init__(self, width: int, n_blocks: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.7))
        self.blocks = nn.ModuleList(_AlphaBlock(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x, self.alpha)
        return self.head(x)


class RootArg(_Family):
    """A parameter of the root passed into every block and used at the end of its forward:
    the first block's only input that needs a gradient is that parameter."""
    @staticmethod
    def build(width: int, n_blocks: int):
        return _AlphaNet(width, n_blocks)


class _GetterBlock(nn.Module):
    def __init__(self, d: int, getter):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self._alpha = getter

    def forward(self, x):
        return x + self._alpha() * torch.tanh(self.fc(x))


class _GetterNet(nn.Module):
    def __init__(self, width: int, n_blocks: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.7))
        self.blocks = nn.ModuleList(_GetterBlock(width, lambda: self.alpha) for _ in range(n_blocks))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class RootGetter(_Family):
    """Every block reads the root's parameter through a closure over the root (``lambda:
    self.alpha``), as some models reach a shared scale."""
    @staticmethod
    def build(width: int, n_blocks: int):
        return _GetterNet(width, n_blocks)


class _TokenNet(nn.Module):
    def __init__(self, width: int, n_blocks: int):
        super().__init__()
        self.emb = nn.Embedding(11, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, 11)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class DictBatch(_Family):
    """Batches as transformers has them: a dict of input_ids, attention_mask and labels, with
    padded positions (-100) left out of the loss."""
    @staticmethod
    def build(width: int, n_blocks: int):
        return _TokenNet(width, n_blocks)

    @staticmethod
    def make_batch(kw: dict, n: int, gen: torch.Generator):
        ids = torch.randint(1, 11, (n, 5), generator=gen)
        lengths = torch.randint(2, 6, (n,), generator=gen)
        mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
        labels = torch.where(mask.bool(), torch.randint(0, 11, (n, 5), generator=gen), -100)
        return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}

    @staticmethod
    def loss(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"]).float()
        return F.cross_entropy(logits.reshape(-1, 11), batch["labels"].reshape(-1), ignore_index=-100)


class _ClampBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        with torch.no_grad():
            self.fc.weight.clamp_(-0.3, 0.3)   # a max-norm style constraint, in place
        return x + torch.tanh(self.fc(x))


class ClampsInForward(_Family):
    """Each block clamps its weight in place at the start of its forward: the parameters
    change outside the optimizer."""
    @staticmethod
    def build(width: int, n_blocks: int):
        return _Stack([_ClampBlock(width) for _ in range(n_blocks)], width)
