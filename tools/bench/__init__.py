"""The gateway's performance report: every figure beside its target, with PASS or FAIL.

    python -m tools.bench [--quick] [--sections 1,2,3,4,5,6] [--fanout-levels 1000,10000]
                          [--json FILE] [--strict] [--litellm auto|off|CMD]
    tools/bench_fanout.py [--fanout-levels 1000,10000]      # section 5 alone

Columns, all against the same fake OpenAI-compatible upstream
(``tools/fake_openai.py``, its own process on 127.0.0.1): ``direct`` (the
client calls the upstream itself), ``gateway /v1`` and ``gateway /api`` (one
``python -m server`` process reaching the fake through its ``openai``
provider, or where it has none, its built-in mock set to the same timings),
and ``litellm`` where LiteLLM's proxy is installed. Runs alternate between the
columns so that a noisy neighbour hurts them alike; ratios to ``direct`` are
given beside the absolute figures.

1. TTFT of one stream: the time the gateway adds to a direct call, p50 and
   p95 (:mod:`tools.bench.ttft`).
2. 50 identical streams at once: upstream calls, and TTFT p95 as a ratio to
   direct (:mod:`tools.bench.identical`).
3. Leaving a stream: the client closes its socket, or calls Stop (``DELETE``
   on its ``stop_url``), after 3 tokens; the time until the upstream saw its
   connection close (:mod:`tools.bench.cancel`).
4. Throughput of distinct non-stream requests against an upstream that
   answers at once, and the server's CPU per request (:mod:`tools.bench.throughput`).
5. Fan-out of one flight to 1,000 and 10,000 SSE subscribers held by several
   load processes: every token checked, server CPU per delivered event,
   delivery lag against the upstream's schedule, server RSS per subscriber
   (:mod:`tools.bench.fanout`, :mod:`tools.bench.fanout_load`).
6. Server memory: idle after a warm-up, and after 10,000 distinct requests
   once the result TTL has passed, on a gateway of its own (:mod:`tools.bench.memory`).

The targets are in :mod:`tools.bench.targets` and beside each section's
figures; sections 1-4 share one set of processes and one client
(:mod:`tools.bench.harness`, :mod:`tools.bench.side_by_side`), section 6 their
fake upstream and a gateway of its own; the command line is :mod:`tools.bench.cli`.

Where there are at least two cores, the server runs on one half and the load
(with the fake upstream) on the other (``os.sched_setaffinity``); the
benchmark raises its own processes' open-files limit for the fan-out. Prints
Markdown; ``--json FILE`` writes everything measured. Exits 1 if a run broke
(a stream failed, a subscriber missed a token), and with ``--strict`` also
when a target was missed.
"""
