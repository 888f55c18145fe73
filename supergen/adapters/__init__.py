"""Model adapters: one file per model family, each implementing the protocol in ``base.py``."""
