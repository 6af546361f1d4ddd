"""A fitted scikit-learn random forest as plain tensors: fast batched predict, safe to save.

``TensorForest.from_sklearn(rf)`` copies every tree's node arrays (feature, threshold, children,
leaf class fractions) into padded tensors ``[T, max_nodes]``. ``predict_proba`` walks all trees
for all samples at once, one gather per depth level (``max_depth`` steps), on CPU or CUDA; it
returns what ``rf.predict_proba`` returns (same float32 comparison ``x[f] <= threshold`` as
scikit-learn's trees, leaf fractions averaged over trees).

Saving a forest is saving these tensors (``state_dict``): no pickled scikit-learn object, so a
saved detector is loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

__all__ = ["TensorForest"]


class TensorForest:
    def __init__(self, feature: torch.Tensor, threshold: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 value: torch.Tensor, max_depth: int):
        self.feature = feature          # [T, K] int64 (0 at leaves)
        self.threshold = threshold      # [T, K] float32
        self.left = left                # [T, K] int64 (self at leaves)
        self.right = right              # [T, K] int64
        self.value = value              # [T, K, n_classes] float32 (class fractions)
        self.max_depth = int(max_depth)

    @classmethod
    def from_sklearn(cls, rf) -> "TensorForest":
        trees = [est.tree_ for est in rf.estimators_]
        k = max(t.node_count for t in trees)
        n_t = len(trees)
        n_cls = int(rf.n_classes_)
        feature = np.zeros((n_t, k), np.int64)
        threshold = np.zeros((n_t, k), np.float32)
        left = np.tile(np.arange(k, dtype=np.int64), (n_t, 1))
        right = left.copy()
        value = np.zeros((n_t, k, n_cls), np.float32)
        depth = 0
        for i, t in enumerate(trees):
            nc = t.node_count
            leaf = t.children_left[:nc] == -1
            feature[i, :nc] = np.where(leaf, 0, t.feature[:nc])
            # scikit-learn compares float32 features with the float64 threshold rounded to float32
            threshold[i, :nc] = t.threshold[:nc].astype(np.float32)
            left[i, :nc] = np.where(leaf, np.arange(nc), t.children_left[:nc])
            right[i, :nc] = np.where(leaf, np.arange(nc), t.children_right[:nc])
            v = t.value[:nc, 0, :].astype(np.float64)
            v = v / np.maximum(v.sum(1, keepdims=True), 1e-300)
            value[i, :nc] = v.astype(np.float32)
            depth = max(depth, t.max_depth)
        return cls(torch.from_numpy(feature), torch.from_numpy(threshold), torch.from_numpy(left),
                   torch.from_numpy(right), torch.from_numpy(value), depth)

    def to(self, device) -> "TensorForest":
        return TensorForest(self.feature.to(device), self.threshold.to(device), self.left.to(device),
                            self.right.to(device), self.value.to(device), self.max_depth)

    @property
    def n_trees(self) -> int:
        return self.feature.shape[0]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, n_classes]`` of features ``x [N, m]`` (cast to float32)."""
        x = x.to(device=self.feature.device, dtype=torch.float32)
        n = x.shape[0]
        t, k = self.feature.shape
        flat = self._flat()
        # node: global index tree * k + node, per (sample, tree); children stored globally too
        node = (torch.arange(t, device=x.device) * k)[None, :].expand(n, t).contiguous()
        for level in range(self.max_depth):
            go_right = x.gather(1, flat["feature"][node]) > flat["threshold"][node]
            node = flat["children"][node * 2 + go_right]
            if level % 4 == 3 and bool(flat["leaf"][node].all()):
                break
        return flat["value"][node].mean(1)

    def _flat(self) -> Dict[str, torch.Tensor]:
        cache = getattr(self, "_flat_cache", None)
        if cache is None or cache["feature"].device != self.feature.device:
            t, k = self.feature.shape
            base = (torch.arange(t, device=self.feature.device) * k)[:, None]
            children = torch.stack([self.left + base, self.right + base], -1).reshape(-1)
            cache = {"feature": self.feature.reshape(-1), "threshold": self.threshold.reshape(-1),
                     "children": children, "leaf": (self.left == torch.arange(k, device=self.left.device)).reshape(-1),
                     "value": self.value.reshape(t * k, -1)}
            self._flat_cache = cache
        return cache

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"feature": self.feature.cpu(), "threshold": self.threshold.cpu(), "left": self.left.cpu(),
                "right": self.right.cpu(), "value": self.value.cpu(),
                "max_depth": torch.tensor(self.max_depth)}

    @classmethod
    def from_state_dict(cls, d: Dict[str, torch.Tensor]) -> "TensorForest":
        need = ("feature", "threshold", "left", "right", "value", "max_depth")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"saved forest lacks {missing}")
        feature, left, right = d["feature"].long(), d["left"].long(), d["right"].long()
        threshold, value = d["threshold"].float(), d["value"].float()
        if not (feature.shape == threshold.shape == left.shape == right.shape == value.shape[:2]) or feature.dim() != 2:
            raise ValueError("saved forest arrays have inconsistent shapes")
        k = feature.shape[1]
        if feature.numel() and (int(left.min()) < 0 or int(left.max()) >= k or int(right.min()) < 0
                                or int(right.max()) >= k or int(feature.min()) < 0):
            raise ValueError("saved forest has out-of-range node or feature indices")
        return cls(feature, threshold, left, right, value, int(d["max_depth"]))
