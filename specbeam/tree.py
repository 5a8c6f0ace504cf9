"""Draft trees: the candidate continuations proposed under one running sequence.

Node 0 is the root, the sequence's last token (its K/V not yet in the cache); every other node is one drafted
token whose parent has a smaller index. For sampling, `draft_probs[i]` is the distribution q that node i's
children were drawn from."""
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: list[int]  # [num_nodes] token of each node; tokens[0] is the root
    parents: list[int]  # [num_nodes] parent index; -1 for the root
    draft_probs: torch.Tensor | None = None  # [num_nodes, vocab] q at each node (sampling only)

    @classmethod
    def root_only(cls, token: int) -> "DraftTree":
        return cls([token], [-1])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        depth = [0] * len(self)
        for node in range(1, len(self)):
            depth[node] = depth[self.parents[node]] + 1
        return depth

    def path(self, node: int) -> list[int]:
        """Node indices from the root down to `node`."""
        nodes = [node]
        while self.parents[nodes[-1]] >= 0:
            nodes.append(self.parents[nodes[-1]])
        return nodes[::-1]

    def child(self, node: int, token: int) -> int | None:
        """The first child of `node` carrying `token`, if any."""
        for index in range(node + 1, len(self)):
            if self.parents[index] == node and self.tokens[index] == token:
                return index
        return None
