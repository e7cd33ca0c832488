"""Measurement tools for the gateway (the phase-1 acceptance suite and the benchmarks), and the
client (:mod:`tools.client`) and SSE reader (:mod:`tools.sse`) that the tests use too."""
