"""The one place the pack imports the host's V3 node API, so a host version shift is a one-line change; and the
base of every Retrace node."""

from __future__ import annotations

import functools
import math
from typing import Any

from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401


def float_inputs(cls: type) -> tuple[str, ...]:
    """The ids of a node's FLOAT inputs, from its schema."""
    return tuple(i.id for i in cls.define_schema().inputs if isinstance(i, io.Float.Input))


def refuse_non_finite(cls: type, inputs: dict[str, Any]) -> None:
    """Raise, naming the input, where a FLOAT input is NaN or infinite (JSON carries both past the host's min/max
    checks, since every comparison with NaN is false)."""
    for name in float_inputs(cls):
        value = inputs.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            schema = cls.define_schema()
            raise ValueError(f"{schema.display_name or schema.node_id}: {name} is {value}; it needs a finite number "
                             f"(NaN and infinity are refused). Set {name} to a number in the widget's range.")


class RetraceNode(io.ComfyNode):
    """Every Retrace node. Its ``execute`` first refuses NaN and infinite FLOAT inputs, before any work."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("execute")
        # The host runs nodes through locked clones that copy the class's dict: wrap once, where it is defined.
        if not isinstance(own, classmethod) or getattr(own.__func__, "retrace_checks_floats", False):
            return
        run = own.__func__

        @functools.wraps(run)
        def execute(klass: type, *args: Any, **inputs: Any) -> Any:
            refuse_non_finite(klass, inputs)
            return run(klass, *args, **inputs)

        execute.retrace_checks_floats = True
        cls.execute = classmethod(execute)
