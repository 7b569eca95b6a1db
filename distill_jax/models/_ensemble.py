"""A teacher made of several networks: K copies of one network with their own parameters, run in one vmapped
call, whose prediction is the mean of their logits (Hinton et al. 2015, section 3: an ensemble as the teacher
whose knowledge a single student distils).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from distill_jax.models._layers import Features

__all__ = ["Ensemble"]

MEMBER_LOGITS = "member_logits"  # the features key of each member's own logits [K, batch, classes]


class _Member(nn.Module):
    network: nn.Module

    def __call__(self, x, deltas):
        return self.network(x, return_features=True, deltas=deltas)


class Ensemble(nn.Module):
    """K members of `network`'s architecture with independent parameters (stacked on a leading axis of size K
    under `params["members"]["network"]`, each initialised from its own key), evaluated in one `nn.vmap`.

    Output: logits [batch, classes] = (1/K) sum_k logits_k(x). With `return_features=True` also the features:
    each of the network's features averaged over the members ([batch, ...], so hints, attention transfer,
    Grad-CAM and CKA read them as a single network's), and `member_logits` [K, batch, classes], each member's
    own logits, from which the `labels` term trains every member on its own (their losses summed, so each
    member's gradient is the one it would have alone). `deltas[layer]` is added to that feature in every member.

    `impl` and `dtype` (when set) override the network's, so `models.forward_only`, `for_queries` and
    `with_compute_dtype` work on an ensemble as on its network.
    """

    network: nn.Module
    members: int
    impl: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        if not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"Ensemble members must be an integer >= 1; got {self.members!r}")
        changes = {k: v for k, v in (("impl", self.impl), ("dtype", self.dtype))
                   if v is not None and hasattr(self.network, k)}
        members = nn.vmap(_Member, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                          out_axes=0, axis_size=self.members)
        member_logits, member_features = members(self.network.clone(**changes), name="members")(x, deltas)
        logits = member_logits.mean(axis=0)
        if not return_features:
            return logits
        features = {name: value.mean(axis=0) for name, value in member_features.items()}
        return logits, {**features, MEMBER_LOGITS: member_logits}
