"""The network-facing node: SCP handlers, completion, scheduler, writers, sender and CLI."""
