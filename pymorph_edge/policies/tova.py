"""TOVA, token omission via attention: Oren et al., 2024, https://arxiv.org/abs/2401.06104.

At every step evicts the tokens that the current token attends to least. Only the newest token is
protected (`window`=1 by default); nothing is remembered between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymorph_edge.policies.base import AttentionWindowPolicy


@dataclass
class TOVA(AttentionWindowPolicy):
    """TOVA: evicts the tokens the current token attends to least; nothing is remembered between steps.

    Parameters
    ----------
    window : int, default 1
        Recent tokens always kept (the newest only, as in the paper).
    aggregate : {"mean", "max"}, default "mean"
        How KV heads and layers combine into one score per cell.
    """

    window: int = 1

    name = "tova"
    native_kind = "PME_POLICY_TOVA"
