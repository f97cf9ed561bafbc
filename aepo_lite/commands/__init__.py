"""Subcommands of ``aepo-lite``: one module each, exposing ``register(subparsers)``.

Each ``register`` adds a parser and sets ``func=<callable(args) -> int>`` on it.
"""
