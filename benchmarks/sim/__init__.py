"""Discrete-event simulator of a kvray deployment: router policies over replicas that run the
real kvray Scheduler and BlockManager, with step times from a StepTimeModel (no model, no GPU).

``workload`` builds requests from the Azure traces, ``replica`` wraps one engine-less replica,
``cluster`` runs the event loop for one (policy, replicas, rate) point, ``report`` computes
goodput and writes JSON/PNG/markdown. ``benchmarks/router_sim.py`` is the command line.
"""
