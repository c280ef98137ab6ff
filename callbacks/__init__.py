"""Callbacks shared by stages (attention-probe logging, selection reports and throughput arrive here)."""
