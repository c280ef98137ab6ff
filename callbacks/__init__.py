"""Callbacks every stage gets (see ``Stage.configure_callbacks``): attention-probe maps and throughput for
training stages (and their random state in checkpoints), the selection report for the selector."""

from callbacks.attention_maps import AttentionProbeLogger
from callbacks.rng_state import RngState
from callbacks.selection_report import SelectionReport
from callbacks.throughput import ThroughputMonitor

__all__ = ["AttentionProbeLogger", "RngState", "SelectionReport", "ThroughputMonitor"]
