"""atropos-sandbox: isolated multi-slot sandbox servers for LLM-agent RL rollouts."""

__version__ = "0.1.0"
