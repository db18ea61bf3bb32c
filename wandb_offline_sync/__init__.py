"""Sync offline W&B runs while they are still running.

Two parts: the farm (``wandb_sync_farm``), an HTTPS server on a node with
internet that runs ``wandb sync`` on run directories it sees on the shared
filesystem; and the agent (``from wandb_offline_sync import agent``), which
a training job on a node without internet uses to ask the farm for syncs.

Nothing here is imported eagerly: ``import wandb_offline_sync`` costs
nothing and needs nothing but the standard library.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
