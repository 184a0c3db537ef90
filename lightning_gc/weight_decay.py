"""The paper's coupled weight decay under GC: centralizing ``g + lambda * w`` instead of ``g``.

The paper's SGD_GC adds the L2 term before GC. Optimizers with coupled decay add ``lambda * w`` *after*
our hook, so we pre-compensate: with ``g' = GC(g) - lambda * rowmean(w)`` the optimizer sees
``g' + lambda * w = GC(g + lambda * w)`` exactly. Decoupled decay (AdamW) never touches the gradient, so
there is nothing to centralize.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from torch import optim
from torch.optim import Optimizer

# Optimizers whose `weight_decay` adds `weight_decay * param` to the gradient before anything else.
COUPLED_DECAY_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    optim.SGD,
    optim.Adam,
    optim.Adamax,
    optim.Adagrad,
    optim.Adadelta,
    optim.RMSprop,
    optim.ASGD,
    optim.NAdam,
    optim.RAdam,
)


class DecayKind(enum.Enum):
    """How a parameter group applies weight decay."""

    NONE = "none"
    COUPLED = "coupled"
    DECOUPLED = "decoupled"
    UNKNOWN = "unknown"


def decay_kind(optimizer: Optimizer, group: dict[str, Any]) -> DecayKind:
    """Classify ``group``'s weight decay.

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.zeros(2, 2))]
        >>> decay_kind(optim.AdamW(p), optim.AdamW(p).param_groups[0])
        <DecayKind.DECOUPLED: 'decoupled'>
    """
    if not group.get("weight_decay"):
        return DecayKind.NONE
    if isinstance(optimizer, optim.AdamW) or group.get("decoupled_weight_decay", False):
        return DecayKind.DECOUPLED
    if isinstance(optimizer, COUPLED_DECAY_OPTIMIZERS):
        return DecayKind.COUPLED
    return DecayKind.UNKNOWN


def compensation(group: dict[str, Any]) -> float:
    """The signed coefficient ``c`` such that ``g' = GC(g) - c * rowmean(w)`` gives the paper's update.

    ``maximize=True`` optimizers negate the gradient before adding the decay, which flips the sign.
    """
    sign = -1.0 if group.get("maximize", False) else 1.0
    return sign * float(group["weight_decay"])


def decay_for_group(optimizer: Optimizer, group: dict[str, Any], warn: Callable[[str], None]) -> float:
    """The compensation coefficient for ``group`` under ``centralize_weight_decay=True`` (0.0 where none applies).

    Warns through ``warn`` when the group decays but GC cannot centralize that decay (decoupled or unknown).
    """
    kind = decay_kind(optimizer, group)
    name = type(optimizer).__name__
    if kind is DecayKind.COUPLED:
        return compensation(group)
    if kind is DecayKind.DECOUPLED:
        warn(
            f"`centralize_weight_decay=True` does not apply to {name}: its weight decay is decoupled (it never"
            " enters the gradient), so only the gradient is centralized. Use a coupled-decay optimizer (SGD, Adam"
            " with weight_decay) for the paper's GC(g + lambda * w)."
        )
    elif kind is DecayKind.UNKNOWN:
        warn(
            f"`centralize_weight_decay=True`: lightning-gc does not know whether {name} couples its weight decay"
            " into the gradient, so its decay is not centralized. Supported: "
            "SGD, Adam, Adamax, Adagrad, Adadelta, RMSprop, ASGD, NAdam, RAdam."
        )
    return 0.0
