"""Callbacks every stage gets (see ``Stage.configure_callbacks``): attention-probe maps and throughput for
training stages (and their random state in checkpoints), the selection report for the selector; and
``ThreadShare``, which ``vitkd.fit --torch_threads_file`` adds."""

from callbacks.attention_maps import AttentionProbeLogger
from callbacks.rng_state import RngState
from callbacks.selection_report import SelectionReport
from callbacks.thread_share import ThreadShare
from callbacks.throughput import ThroughputMonitor

__all__ = ["AttentionProbeLogger", "RngState", "SelectionReport", "ThreadShare", "ThroughputMonitor"]
