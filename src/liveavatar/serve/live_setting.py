"""The live setting: the size and step count a live session runs at so that it keeps up with real time.

``--live auto`` (the default) takes, from the planner's speed model for this server's GPU, placement and
fast path (`liveavatar.runtime.planner.speed`), the largest size of the ladder (704*384, then the
reference's smaller sizes down to 384*256) and the most steps (4, then 3) whose predicted rate is at least
``TARGET_RTF`` times real time. A session that asks for a size or steps predicted to fall behind real time
is accepted with a warning naming the lag it will build per minute; ``--live strict`` refuses it. On the
CPU there is no speed model: the smallest ladder size within ``--max-size`` (or the one given) is used
and said so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from liveavatar.errors import InputError
from liveavatar.geometry import FPS, ClipGeometry, size_for_area
from liveavatar.options import DEFAULTS, RequestOptions, parse_size

LADDER = ("704*384", "688*368", "384*256")
STEP_LADDER = (4, 3)
TARGET_RTF = 1.15
POLICIES = ("auto", "strict")

# (area, steps) -> predicted real-time factor (video seconds made per second), None where no model applies.
RatePredictor = Callable[[int, int], "float | None"]


def live_predictor(plan, ckpt_dir, backend, attention: str) -> RatePredictor | None:
    """The speed model for the server's GPU, placement, fast path and attention (None on the CPU: no model
    there)."""
    from liveavatar.runtime.planner.memory import dit_inventory, transformer_config_for

    if plan.budget_bytes is None:
        return None
    fast = backend.engine.fast_path
    path = "graphs" if fast.cuda_graphs and plan.placement.resident else "compiled" if fast.compile else "eager"
    return speed_model_predictor(dit_inventory(transformer_config_for(ckpt_dir)), plan.placement, plan.hardware,
                                 run_dtype_bytes=plan.workload.run_dtype_bytes, path=path, attention=attention)


def speed_model_predictor(inventory, placement, hardware, *, run_dtype_bytes: int, path: str,
                          attention: str = DEFAULTS.attention) -> RatePredictor:
    """The speed model's real-time factor of one live session at (area, steps) on this placement."""
    from liveavatar.runtime.planner.memory import Workload
    from liveavatar.runtime.planner.speed import estimate_speed

    def predict(area: int, steps: int) -> float:
        options = RequestOptions(size=area, sample_steps=steps, attention=attention)
        work = Workload.of(ClipGeometry(*landscape(area), options.infer_frames), options,
                           run_dtype_bytes=run_dtype_bytes, audio_seconds=0.0)
        return estimate_speed(inventory, work, placement, hardware, path=path).fps / FPS

    return predict


@dataclass(frozen=True)
class LiveSetting:
    size: str
    sample_steps: int
    predicted_rtf: float | None
    policy: str
    reason: str  # how it was chosen, printed at start
    predict: RatePredictor = field(default=lambda area, steps: None, repr=False, compare=False)

    def info(self) -> dict:
        """What ``GET /v1/info`` and each session's ``ready`` message say about it."""
        rtf = None if self.predicted_rtf is None else round(self.predicted_rtf, 2)
        return {"size": self.size, "sample_steps": self.sample_steps, "predicted_rtf": rtf, "policy": self.policy}

    def check(self, size: str, steps: int) -> tuple[float | None, str | None]:
        """A session's asked setting: (its predicted rate, a warning when it falls behind real time).
        Under ``strict`` such a setting is refused (InputError)."""
        rtf = self.predict(parse_size(size), steps)
        if rtf is None or rtf >= 1.0:
            return rtf, None
        growth = 60.0 * (1.0 - rtf)
        message = (f"size {size} at {steps} steps is predicted at {rtf:.2f}x real time on this server: the avatar "
                   f"falls {growth:.0f} s further behind per minute of speech (the lag bound then drops audio); "
                   f"this server keeps up at {self.size}, {self.sample_steps} steps")
        if self.policy == "strict":
            raise InputError(f"{message} (--live strict refuses it)")
        return rtf, message


def choose_live_setting(predict: RatePredictor | None, *, max_area: int, max_steps: int, policy: str = "auto",
                        size: str | None = None, steps: int | None = None) -> LiveSetting:
    """The live setting for this server (``size``/``steps`` pin it; otherwise the ladder decides)."""
    if policy not in POLICIES:
        raise InputError(f"--live {policy!r}: expected one of {', '.join(POLICIES)}")
    ladder = [s for s in LADDER if parse_size(s) <= max_area] or [_smallest(max_area)]
    step_ladder = [s for s in STEP_LADDER if s <= max_steps] or [max_steps]
    rate = predict or (lambda area, steps: None)
    if size is not None or steps is not None:
        size = size or ladder[-1]
        steps = steps or step_ladder[-1]
        if parse_size(size) > max_area or steps > max_steps:
            raise InputError(f"--live-size {size} / --live-steps {steps}: above --max-size / --max-steps")
        return LiveSetting(size, steps, rate(parse_size(size), steps), policy, "given by --live-size/--live-steps",
                           rate)
    if predict is None:
        return LiveSetting(ladder[-1], step_ladder[-1], None, policy,
                           "no speed model on the CPU: the smallest size (give --live-size / --live-steps to choose)",
                           rate)
    for candidate in ladder:
        for count in step_ladder:
            rtf = predict(parse_size(candidate), count)
            if rtf >= TARGET_RTF:
                return LiveSetting(candidate, count, rtf, policy,
                                   f"the largest predicted at >= {TARGET_RTF}x real time", predict)
    smallest, fewest = ladder[-1], step_ladder[-1]
    rtf = predict(parse_size(smallest), fewest)
    return LiveSetting(smallest, fewest, rtf, policy, f"nothing reaches {TARGET_RTF}x real time here; the fastest "
                                                      f"setting ({rtf:.2f}x) falls behind", predict)


def landscape(area: int) -> tuple[int, int]:
    """(height, width) of an area for a landscape portrait (the reference's 704x384 examples): what the
    server plans and predicts for."""
    return size_for_area(384, 704, area)


def _smallest(max_area: int) -> str:
    height, width = landscape(max_area)
    return f"{width}*{height}"


def describe(setting: LiveSetting) -> str:
    """The line ``serve`` prints at start."""
    rtf = "" if setting.predicted_rtf is None else f", predicted {setting.predicted_rtf:.2f}x real time"
    return (f"live setting: {setting.size}, {setting.sample_steps} steps{rtf} ({setting.reason}; "
            f"--live {setting.policy})")

