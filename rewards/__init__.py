"""Rule-based rewards (math, code, format) and the plugin registry; see rewards/README.md."""


def shutdown() -> None:
    """Stop the reward worker processes and reap what sandboxed programs left behind. Rewards still work after
    it (they start fresh workers); the pools are also closed at interpreter exit."""
    from rewards.pool import close_pools
    from rewards.sandbox import reap_orphans

    close_pools()
    reap_orphans()
