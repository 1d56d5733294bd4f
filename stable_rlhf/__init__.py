"""stable-rlhf: stabilised RLHF (Advantage Model, Selective Rehearsal) with a gold-reward testbed."""

__version__ = "0.1.0"
