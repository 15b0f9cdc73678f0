"""SLO classes: which one a request gets, whether it was met, the urgency order (pure Python)."""
import pytest

from kvray.slo import SLOError, SLOTarget, resolve_slo, urgency

CLASSES = {"interactive": SLOTarget("interactive", 500, 50), "batch": SLOTarget("batch", 10000, 200, 0.5)}


def test_slo_resolution_order():
    assert resolve_slo(CLASSES, "interactive").name == "interactive"
    assert resolve_slo(CLASSES, "interactive", body_class="batch").name == "batch"
    assert resolve_slo(CLASSES, "interactive", header_class="batch", body_class="interactive").name == "batch"
    t = resolve_slo(CLASSES, "interactive", header_ttft_ms="250")
    assert (t.name, t.ttft_ms, t.tpot_ms) == ("custom", 250.0, 50)
    t = resolve_slo(CLASSES, "interactive", body_class="batch", header_tpot_ms="20")
    assert (t.name, t.ttft_ms, t.tpot_ms, t.priority) == ("batch", 10000, 20.0, 0.5)
    with pytest.raises(SLOError) as e:
        resolve_slo(CLASSES, "interactive", header_class="gold")
    assert e.value.param == "x-slo-class"
    for bad in ("abc", "-1", "0", "inf"):
        with pytest.raises(SLOError):
            resolve_slo(CLASSES, "interactive", header_ttft_ms=bad)


def test_slo_attainment():
    t = CLASSES["interactive"]
    assert t.attained(0.4, 0.04) and t.attained(0.4, None)
    assert not t.attained(0.6, 0.01) and not t.attained(0.1, 0.06) and not t.attained(None, None)



def test_a_class_without_a_tpot_target_and_the_urgency_order():
    assert SLOTarget("loose", 1000).attained(0.5, 10.0)
    now = 100.0
    keys = [urgency(now + 1.0, 2.0, now), urgency(now + 1.0, 1.0, now), urgency(now - 1.0, 2.0, now),
            urgency(None, 1.0, now)]
    assert keys[0] < keys[1] < keys[2] < keys[3]  # weighted slack, then late ones, then no target
    assert urgency(now - 5.0, 1.0, now) < urgency(now - 1.0, 9.0, now)  # late ones by deadline


def test_one_target_record_in_ms_and_seconds():
    t = SLOTarget("i", 500, 50, 2.0)
    assert (t.ttft_s, t.tpot_s) == (0.5, 0.05) and t.deadline(10.0) == 10.5
    none = SLOTarget("none")
    assert none.ttft_s is None and none.tpot_s is None and none.deadline(10.0) is None
    assert t == SLOTarget("i", 500, 50, 2.0) and hash(t) == hash(SLOTarget("i", 500, 50, 2.0))
    for bad in (dict(ttft_ms=0), dict(tpot_ms=-1), dict(priority=0), dict(ttft_ms=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SLOTarget("x", **bad)
