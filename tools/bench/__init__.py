"""Side-by-side benchmarks of the gateway.

    python -m tools.bench [--quick] [--sections 1,2,3,4,5,6] [--json FILE] [--litellm auto|off|CMD]
    tools/bench_fanout.py [--subscribers 100,500,1000]      # section 5 alone

Columns, all against the same fake OpenAI-compatible upstream
(``tools/fake_openai.py``, its own process on 127.0.0.1): ``direct`` (the
client calls the upstream itself), ``gateway`` (``python -m server`` in its
own process, through the thread API; it reaches the fake through its
``openai`` provider, or where it has none, through its built-in mock set to
the same timings), and ``litellm`` where LiteLLM's proxy is installed. Runs
alternate between the columns so that a noisy neighbour hurts them alike;
ratios to ``direct`` are given beside the absolute figures.

1. TTFT of one stream: the time the gateway adds to a direct call
   (:mod:`tools.bench.ttft`).
2. 50 identical streams at once: upstream calls, and TTFT p95 as a ratio to
   direct (:mod:`tools.bench.identical`).
3. Cancel latency: the client closes its socket after 3 tokens; the time
   until the upstream saw its connection close (the fake's timestamps share
   ``CLOCK_MONOTONIC`` with the client) (:mod:`tools.bench.cancel`).
4. Throughput of distinct non-stream requests against an upstream that
   answers at once, and the server's CPU per request (:mod:`tools.bench.throughput`).
5. Fan-out of one mock flight to 100, 500 and 1000 SSE subscribers driven
   from separate processes: every token checked, server CPU per delivered
   event, p50/p99/max delivery lag, server RSS per subscriber (:mod:`tools.bench.fanout`).
6. Server RSS idle and at its peak under the load of sections 2 and 4
   (:mod:`tools.bench.rss`).

Sections 1-4 and 6 share one set of processes and one client
(:mod:`tools.bench.harness`, :mod:`tools.bench.side_by_side`); the command
line is :mod:`tools.bench.cli`.

Where there are at least two cores, the server runs on one half and the load
(with the fake upstream) on the other (``os.sched_setaffinity``). Prints
Markdown; ``--json FILE`` writes everything measured. Exits 1 if a check
failed (a fan-out subscriber missed a token, a stream broke).
"""
