"""DeepSpeed internals ftune relies on, each wrapped once (tested in test_compat)."""

from __future__ import annotations


def op_is_compatible(name: str) -> bool:
    """Whether DeepSpeed found its op ``name`` buildable on this machine.

    Reads ``deepspeed.ops.__compatible_ops__``: DeepSpeed fills this table at import and consults it
    before a JIT build; it offers no public query.
    """
    import deepspeed.ops

    return bool(deepspeed.ops.__compatible_ops__.get(name, False))


def link_optimizer_state(zero_optimizer: object) -> bool:
    """Link each parameter's high-precision view to the optimizer state now (False: no such step here).

    ``DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state``: ZeRO links the views lazily, inside
    its own step; a restore that fills the state without a DeepSpeed step (so that ``safe_set_full_*``
    reaches it) has to link them itself.
    """
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is None:
        return False
    link()
    return True


def register_loaded_op(builder: object, module: object) -> None:
    """Make DeepSpeed's ``builder.load()`` return ``module`` in this process without building.

    ``OpBuilder._loaded_ops``: DeepSpeed's per-process table of loaded ops, which ``load()`` consults
    before its JIT path; there is no public way to hand it a library loaded by other means.
    """
    from deepspeed.ops.op_builder.builder import OpBuilder

    OpBuilder._loaded_ops[builder.name] = module
