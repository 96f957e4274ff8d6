"""onelayer: RL post-training of one transformer layer."""
__version__ = "0.1.0"
