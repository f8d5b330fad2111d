"""Exporter: programs, torch.export, one module per target, verification."""
