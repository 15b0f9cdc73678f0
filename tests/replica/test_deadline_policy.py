"""The deadline scheduling policy driving the real kvray Scheduler."""
import pytest

from kvray.replica.block_manager import BlockManager
from kvray.replica.deadline_policy import DeadlinePolicy
from kvray.replica.sampling_params import SamplingParams
from kvray.slo import SLOTarget
from kvray.replica.scheduler import Scheduler
from kvray.replica.scheduling_policy import FCFSPolicy, make_policy
from kvray.replica.sequence import Sequence
from kvray.step_cost import StepTimeModel

BS = 16


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def seq(rid, n, arrival, ttft_ms=None, tpot_ms=None, priority=1.0, max_tokens=64, cls=None):
    p = SamplingParams(max_tokens=max_tokens, slo=SLOTarget(cls or "none", ttft_ms, tpot_ms, priority))
    return Sequence(rid, [hash((rid, i)) % 30000 for i in range(n)], p, BS, arrival_time=arrival)


def interactive(rid, n, arrival, **kw):
    return seq(rid, n, arrival, ttft_ms=500, tpot_ms=50, priority=2.0, cls="interactive", **kw)


def batch(rid, n, arrival, **kw):
    return seq(rid, n, arrival, ttft_ms=10_000, tpot_ms=200, priority=1.0, cls="batch", **kw)


def scheduler(policy, clock, num_blocks=1000, max_batched=256, max_seqs=64):
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs=max_seqs, max_num_batched_tokens=max_batched,
                     max_model_len=min(2048, num_blocks * BS), policy=policy, clock=clock)


def run_step(s, clock, dt=0.02, cost=None):
    """One step of ``dt`` seconds (or what ``cost`` predicts for it); completed prompts get a token."""
    out = s.schedule()
    clock.t += dt if cost is None else cost.predict(out.num_batched_tokens, out.num_context_tokens,
                                                    len(out.scheduled))
    s.update_after_step(out)
    for q, _ in out.scheduled:
        if q.num_computed_tokens == q.num_tokens:
            q.token_ids.append(1)
            if q.metrics.first_token_time is None:
                q.metrics.first_token_time = clock.t
    return out


def test_registered_and_fcfs_stays_default():
    assert isinstance(make_policy("deadline"), DeadlinePolicy)
    assert isinstance(make_policy(None), FCFSPolicy)


def test_urgent_interactive_admitted_before_earlier_batch():
    for policy, first in ((DeadlinePolicy(), "i"), (FCFSPolicy(), "b0")):
        clock = Clock()
        s = scheduler(policy, clock)
        for k in range(3):
            s.add(batch(f"b{k}", 256, arrival=0.0))
        clock.t = 0.1
        s.add(interactive("i", 256, arrival=0.1))
        out = s.schedule()  # 256-token budget: exactly one prompt this step
        assert [q.request_id for q, _ in out.scheduled] == [first]


def test_order_by_weighted_slack_then_late_requests_last():
    clock = Clock()
    pol = DeadlinePolicy()
    late = batch("late", 32, arrival=0.0)          # deadline 10 s: missed by t=11
    soon = batch("soon", 32, arrival=10.5)        # deadline 20.5 s
    inter = interactive("inter", 32, arrival=10.9)  # deadline 11.4 s, priority 2
    nodl = seq("none", 32, arrival=0.0)           # no target: arrival + 30 s
    clock.t = 11.0
    from collections import deque
    order = [q.request_id for q in pol.order_waiting(deque([late, soon, nodl, inter]), clock.t)]
    assert order == ["inter", "soon", "none", "late"]


def test_lower_class_preempted_first():
    clock = Clock()
    # 8 blocks of 16 tokens: two 48-token prompts fill 6; decoding soon needs more.
    s = scheduler(DeadlinePolicy(), clock, num_blocks=8, max_batched=512)
    b = batch("b", 48, arrival=0.0, max_tokens=200)
    i = interactive("i", 48, arrival=0.01, max_tokens=200)
    s.add(b)
    s.add(i)
    preempted = []
    for _ in range(80):
        out = run_step(s, clock)
        preempted += [q.request_id for q in out.preempted]
        if preempted:
            break
    assert preempted and preempted[0] == "b"
    assert i in s.running


def test_prefill_budget_protects_tpot():
    clock = Clock()
    pol = DeadlinePolicy()
    s = scheduler(pol, clock, max_batched=8192, num_blocks=4000)
    decoders = [interactive(f"d{k}", 64, arrival=0.0, max_tokens=500) for k in range(30)]
    for d in decoders:
        s.add(d)
    run_step(s, clock)  # all prefilled, first tokens out
    assert all(d.num_output_tokens == 1 for d in decoders)
    budget = pol.prefill_token_budget(s.running, 8192, clock.t)
    assert 0 < budget < 8192
    step = pol.cost.predict(30 + budget, sum(d.num_tokens for d in decoders) + budget, 31)
    assert step <= 0.05 * pol.safety + 1e-6
    # Decodes that are ahead of their TPOT target bank slack: a larger chunk is allowed.
    for _ in range(20):
        run_step(s, clock, dt=0.01)
    assert pol.prefill_token_budget(s.running, 8192, clock.t) > budget
    # Batch-only decodes (200 ms) allow much more; nothing running: the full budget.
    only_batch = [batch(f"x{k}", 64, arrival=0.0) for k in range(30)]
    for q in only_batch:
        q.token_ids.append(1)
        q.num_computed_tokens = q.num_tokens - 1
        q.metrics.first_token_time = clock.t
    assert pol.prefill_token_budget(only_batch, 8192, clock.t) > 3 * budget
    assert pol.prefill_token_budget([], 8192, clock.t) == 8192


def test_prefill_budget_end_to_end_keeps_tpot():
    """Long prompts arriving while interactive requests decode: their mean TPOT stays < 50 ms."""
    clock = Clock()
    pol = DeadlinePolicy()
    s = scheduler(pol, clock, max_batched=8192, num_blocks=8000)
    dec = [interactive(f"d{k}", 128, arrival=0.0, max_tokens=60) for k in range(20)]
    for d in dec:
        s.add(d)
    cost = StepTimeModel()  # the prior: what the policy predicts with too
    for k in range(60):
        if k % 3 == 0:
            s.add(batch(f"p{k}", 2000, arrival=clock.t))
        run_step(s, clock, cost=cost)
    for d in dec:
        tpot = (clock.t - d.metrics.first_token_time) / max(1, d.num_output_tokens - 1)
        assert tpot < 0.05


def test_the_policy_predicts_with_the_model_it_is_given():
    pol = DeadlinePolicy()
    base = pol.cost.predict(1000, 10000, 10)
    for _ in range(200):  # what the engine does after every step it runs
        pol.cost.observe(1000, 10000, 10, 2 * base)
    assert pol.cost.predict(1000, 10000, 10) == pytest.approx(2 * base, rel=0.05)


def test_the_engine_fits_the_one_model_its_policy_and_stats_use():
    from kvray import LLM, SamplingParams as SP

    llm = LLM("kvray:tiny-qwen3", max_model_len=256, num_kv_blocks=64, scheduling_policy="deadline")
    eng = llm.engine
    assert eng.policy.cost is eng.step_cost
    llm.generate([[1, 2, 3] * 10] * 4, SP(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    stats = eng.stats()
    assert stats.num_steps == eng.step_cost.num_samples >= 40
    assert stats.step_coeffs == eng.step_cost.coeffs.as_tuple() != eng.step_cost.prior.as_tuple()


def _long_prefill_then_urgent(policy):
    """A 2,000-token batch prompt starts its chunked prefill (256 tokens a step); an interactive
    request arrives on the next step. Returns (the interactive request, the steps' outputs)."""
    clock = Clock()
    s = scheduler(policy, clock, max_batched=256)
    long = batch("long", 2000, arrival=0.0)
    s.add(long)
    outs = [run_step(s, clock)]
    urgent = interactive("urgent", 200, arrival=clock.t)
    s.add(urgent)
    outs += [run_step(s, clock) for _ in range(3)]
    return long, urgent, outs


def test_an_urgent_prompt_overtakes_a_running_long_prefill():
    long, urgent, outs = _long_prefill_then_urgent(DeadlinePolicy())
    granted = dict((q.request_id, n) for q, n in outs[1].scheduled)
    assert granted["urgent"] == 200 and granted["long"] == 56  # the rest of the step's 256 prompt tokens
    assert urgent.metrics.first_token_time is not None and urgent.metrics.first_token_time == pytest.approx(0.04)
    assert long.num_computed_tokens > 256 + 56 + 256  # then the long prefill goes on (nothing more urgent waits)
    # FCFS keeps the running prefill first: the interactive prompt waits for the long one's chunks
    long_f, urgent_f, outs_f = _long_prefill_then_urgent(FCFSPolicy())
    assert [n for q, n in outs_f[1].scheduled] == [256] and urgent_f.metrics.first_token_time is None


def test_prefill_grants_go_by_urgency_across_running_and_waiting_sequences():
    clock = Clock()
    pol = DeadlinePolicy()
    s = scheduler(pol, clock, max_batched=256)
    long = batch("long", 2000, arrival=0.0)
    s.add(long)
    run_step(s, clock)  # the batch prompt is being prefilled (deadline 10 s)
    inter = interactive("inter", 1000, arrival=clock.t)
    s.add(inter)
    run_step(s, clock)  # an interactive prompt started beside it (deadline 0.52 s)
    prefills = [q for q in s.running if q.num_tokens - q.num_computed_tokens > 1]
    assert [q.request_id for q in prefills] == ["long", "inter"]  # running order: the batch one first
    assert (long.num_computed_tokens, inter.num_computed_tokens) == (256, 256)  # inter took step 2's budget
    # by urgency: the interactive prefill (744 tokens left) first, then the batch one (1,744 left)
    assert pol.prefill_grants(prefills, [], 600, clock.t, 10) == [0, 600]
    assert pol.prefill_grants(prefills, [], 1000, clock.t, 10) == [256, 744]
    # a waiting interactive request more urgent than the batch prefill takes its 100 tokens before it
    # (a waiting batch request due after the running one does not)...
    waiting = [batch("b2", 300, arrival=clock.t), interactive("urgent", 100, arrival=clock.t)]
    assert pol.prefill_grants(prefills, waiting, 2000, clock.t, 10) == [2000 - 744 - 100, 744]
    # ...but only with a free batch slot to be admitted into
    assert pol.prefill_grants(prefills, waiting, 2000, clock.t, 0) == [2000 - 744, 744]
    # FCFS: running prefills first, in running order
    assert FCFSPolicy().prefill_grants(prefills, waiting, 600, clock.t, 10) == [600, 0]
