"""When a score or a rhythm becomes an alert. Thresholds come from settings; the decisions live
here, once, so the scorer and the ECG stream only report what they measured."""

from __future__ import annotations

from bedside.alerts.events import Alert, VitalsScore

NEWS2_LEVELS = {"low": 0, "low-medium": 1, "medium": 2, "high": 3}
MODEL_LEVEL = 3  # a model risk over threshold ranks with a high NEWS2
QSOFA_LEVEL = 2
RHYTHM_LEVEL = 2
NORMAL_RHYTHM = "normal_sinus"


class VitalsEscalation:
    """Alert when a bed's level rises, or what drives it changes (model, rules, degraded); not again
    every cycle. The rules always count: a model may add alerts, never silence NEWS2."""

    def __init__(self, risk_threshold: float) -> None:
        self.threshold = risk_threshold
        self._last: dict[str, tuple[int, str, bool]] = {}

    def forget(self, keep: set[str]) -> None:
        """Drop beds no longer held, so this table stays as bounded as the beds are."""
        for bed in [b for b in self._last if b not in keep]:
            del self._last[bed]

    def decide(self, score: VitalsScore, news_reason: str, sepsis: tuple[str, ...]) -> Alert | None:
        rules_level = max(NEWS2_LEVELS[score.news2_risk], QSOFA_LEVEL if score.qsofa_positive else 0)
        rules_reason = news_reason + (f"; qSOFA positive ({', '.join(sepsis)})" if score.qsofa_positive else "")
        model_level = MODEL_LEVEL if score.risk is not None and score.risk >= self.threshold else 0
        level = max(rules_level, model_level)
        if model_level and model_level >= rules_level:
            source, reason = score.source, f"model risk {score.risk:.2f} (threshold {self.threshold}); {rules_reason}"
        else:
            source, reason = "rules", rules_reason
        key = (level, source, score.degraded)
        previous = self._last.get(score.bed)
        self._last[score.bed] = key
        if level == 0 or (previous is not None and level <= previous[0] and previous[1:] == key[1:]):
            return None
        text = f"{score.reason}. {reason}" if score.reason else reason
        return Alert(
            bed=score.bed,
            time=score.time,
            level=level,
            source=source,
            reason=text,
            degraded=score.degraded,
            risk=score.risk,
            news2=score.news2,
            qsofa=score.qsofa,
        )


class RhythmAlert:
    """One bed's ECG: alert when the confirmed rhythm changes to an abnormal one with enough
    probability. Atrial fibrillation counts as confirmed only on irregular R-R intervals (the
    stream decides `confirmed`); an unconfirmed call is reported, never alerted."""

    def __init__(self, bed: str, min_probability: float) -> None:
        self.bed = bed
        self.min_probability = min_probability
        self.rhythm = NORMAL_RHYTHM

    def decide(self, rhythm: str | None, probability: float, confirmed: bool, source: str, when: float) -> Alert | None:
        if rhythm is None or not confirmed:
            return None
        previous, self.rhythm = self.rhythm, rhythm
        if rhythm in (previous, NORMAL_RHYTHM) or probability < self.min_probability:
            return None
        return Alert(
            bed=self.bed,
            time=when,
            level=RHYTHM_LEVEL,
            source=source,
            reason=f"ECG rhythm {rhythm} (p={probability:.2f})",
        )
