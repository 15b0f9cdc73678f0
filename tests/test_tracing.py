"""Request event tracing (KVRAY_TRACE_DIR) and the latency breakdown built from it."""
import asyncio
import importlib.util
import sys
from pathlib import Path

from kvray import SamplingParams, tracing
from kvray.replica.async_engine import AsyncLLMEngine
from kvray.replica.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def _breakdown_module():
    spec = importlib.util.spec_from_file_location("latency_breakdown", ROOT / "benchmarks" / "latency_breakdown.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["latency_breakdown"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_engine_events_and_breakdown(tmp_path, monkeypatch):
    monkeypatch.setattr(tracing, "ENABLED", True)
    monkeypatch.setattr(tracing, "_DIR", str(tmp_path))
    monkeypatch.setattr(tracing, "_file", None)
    eng = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=128))

    async def main():
        for i in range(3):
            async for _ in eng.generate(f"t{i}", [3, 4, 5 + i], SamplingParams(max_tokens=4, ignore_eos=True)):
                pass
        await eng.shutdown(timeout_s=1)

    asyncio.run(main())
    tracing._file.close()
    bd = _breakdown_module()
    reqs = bd.load(str(tmp_path))
    assert set(reqs) == {"t0", "t1", "t2"}
    for ev in reqs.values():  # the engine's events, in order, each recorded once
        assert ev["engine_submit"] <= ev["engine_add"] <= ev["engine_first_token"] <= ev["engine_emit"] \
            <= ev["engine_delta"]
    rows = {(r["from"], r["to"]): r for r in bd.breakdown(reqs)}
    assert rows[("engine_add", "engine_first_token")]["requests"] == 3
    assert rows[("engine_add", "engine_first_token")]["p50_ms"] > 0
    assert ("router_in", "router_submitted") not in rows  # no Router in this process


def test_breakdown_of_recorded_hops(tmp_path):
    bd = _breakdown_module()
    lines = []
    for i, gap in enumerate([1.0, 2.0, 3.0]):  # ms between router_in and router_submitted
        t = 100.0 + i
        lines += [f"r{i} router_in {t:.6f}", f"r{i} router_submitted {t + gap / 1000:.6f}",
                  f"r{i} router_first_out {t + 10 * gap / 1000:.6f}"]
    (tmp_path / "1.events").write_text("\n".join(lines) + "\n")
    rows = {(r["from"], r["to"]): r for r in bd.breakdown(bd.load(str(tmp_path)))}
    assert abs(rows[("router_in", "router_submitted")]["p50_ms"] - 2.0) < 1e-6
    assert abs(rows[("router_in", "router_first_out")]["p90_ms"] - 30.0) < 1e-6
    assert rows[("router_in", "router_submitted")]["requests"] == 3
