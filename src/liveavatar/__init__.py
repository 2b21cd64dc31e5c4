"""liveavatar: streaming inference engine for Live Avatar (Wan2.2-S2V-14B + Live-Avatar LoRA)."""

__version__ = "0.1.0"
