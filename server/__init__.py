"""The DAC gateway: one upstream call per set of identical concurrent chat requests."""

__version__ = "0.1.0"
