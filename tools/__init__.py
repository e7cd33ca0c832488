"""Measurement tools for the gateway: the phase-1 acceptance suite and the benchmarks."""
