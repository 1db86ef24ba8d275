"""Pack model instances into boxes of a memory budget: first-fit decreasing.

A model's instances share one session (its weights) on a box; each instance that runs at the same
time needs its own working memory. So the first instance of a model on a box costs the session
plus one execution's memory, and each further instance on the same box only the execution's. A
model whose instances land on two boxes pays for its session on both. Each box keeps `reserve_mb`
(the server process with no model loaded) and a `headroom` fraction of its budget free: RSS
measurements are noisy, and the allocator fragments.

First-fit decreasing (largest first cost first, each into the first box it fits) uses at most
11/9 OPT + 6/9 boxes for plain bin packing; here it also keeps a model's instances together, since
its further instances are small and come right after the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bedside.errors import BedsideError


class DoesNotFit(BedsideError):
    """An instance larger than a whole box: no number of boxes holds it (exit 2)."""

    status = 400


@dataclass(frozen=True, slots=True)
class ModelSize:
    name: str
    instances: int
    session_mb: float  # the weights and session, once per box that holds the model
    instance_mb: float  # one instance's working memory


@dataclass
class Box:
    capacity_mb: float  # what models may use: budget less reserve and headroom
    used_mb: float = 0.0
    instances: dict[str, int] = field(default_factory=dict)  # model -> instances on this box

    def cost(self, model: ModelSize) -> float:
        return model.instance_mb + (0.0 if model.name in self.instances else model.session_mb)

    def free_mb(self) -> float:
        return self.capacity_mb - self.used_mb


@dataclass
class Packing:
    budget_mb: float
    reserve_mb: float
    headroom: float
    boxes: list[Box]

    def box_count(self) -> int:
        return len(self.boxes)

    def share(self, box: int, model: str, total_instances: int) -> float:
        """The fraction of the model's load this box takes: its share of the model's instances."""
        return self.boxes[box].instances.get(model, 0) / total_instances if total_instances else 0.0


def pack(models: list[ModelSize], budget_mb: float, reserve_mb: float = 0.0, headroom: float = 0.1) -> Packing:
    """Place every instance of every model, first-fit decreasing; DoesNotFit when one cannot fit even
    an empty box."""
    if budget_mb <= 0:
        raise DoesNotFit(f"the memory budget must be above 0 MB, got {budget_mb:g}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is a fraction of the budget kept free, 0 to below 1, got {headroom}")
    capacity = budget_mb * (1 - headroom) - reserve_mb
    if capacity <= 0:
        raise DoesNotFit(
            f"a box of {budget_mb:g} MB has no room for models: the server itself takes {reserve_mb:.0f} MB "
            f"and {headroom:.0%} is kept free"
        )
    for model in models:
        if model.session_mb + model.instance_mb > capacity:
            raise DoesNotFit(
                f"model {model.name!r} needs {model.session_mb + model.instance_mb:.1f} MB for one instance, more "
                f"than a box of {budget_mb:g} MB leaves for models ({capacity:.1f} MB after {reserve_mb:.0f} MB for "
                f"the server and {headroom:.0%} headroom); a larger box is needed"
            )
    order = sorted(
        ((m, i) for m in models for i in range(m.instances)),
        key=lambda item: (-(item[0].session_mb + item[0].instance_mb), item[0].name, item[1]),
    )
    boxes: list[Box] = []
    for model, _ in order:
        box = next((b for b in boxes if b.cost(model) <= b.free_mb() + 1e-9), None)
        if box is None:
            box = Box(capacity)
            boxes.append(box)
        box.used_mb += box.cost(model)
        box.instances[model.name] = box.instances.get(model.name, 0) + 1
    return Packing(budget_mb, reserve_mb, headroom, boxes)
