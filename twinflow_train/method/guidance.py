"""The guidance the CFG-enhanced objective distils into the student (docs/method.md §2.2); torch-free, so the
config (``Config.teacher_cfg_scale``) and the harness can use it."""

from __future__ import annotations

__all__ = ["distilled_guidance"]


def distilled_guidance(*, target: str, ratio: float) -> float:
    """The CFG scale the CFG-enhanced objective converges to (docs/method.md §2.2).

    With an EMA or student target, T already carries the guidance it is trained toward, so the fixed
    point of ``v_enh = v + r * (T_c - T_u)`` is ``T_c - T_u = (v_c - v_u) / (1 - r)``: guidance
    ``1 / (1 - r)`` (2 at r = 0.5, 5 at r = 0.8). A frozen base model does not move: ``1 + r``.
    """
    if target == "frozen":
        return 1.0 + ratio
    if target in ("ema", "student"):
        if ratio >= 1.0:
            raise ValueError(f"method.enhanced_ratio {ratio} >= 1 with target {target!r}: no finite fixed point")
        return 1.0 / (1.0 - ratio)
    raise ValueError(f"method.target: unknown value {target!r}; valid: 'ema', 'student', 'frozen'")
