"""``cp-megatron serve CONFIG.yaml``: the OpenAI-compatible server (:mod:`cp_megatron.serve`).

    cp-megatron serve CONFIG.yaml [--host 127.0.0.1] [--port 8000] [--set key.path=value ...]

Exit codes: 0 after a drained stop (SIGTERM / SIGINT), 2 a bad config (one line, before any
rank starts), 1 a rank failed.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """The ``serve`` subcommand."""
    p = subparsers.add_parser("serve", help="serve the OpenAI API (chat, completions) from CP ranks",
                              description="OpenAI-compatible HTTP server on global rank 0; every "
                              "sequence's KV stays sharded over the CP ranks. Ranks start as for "
                              "`run` (spawned here, or joined under torchrun / deepspeed).")
    p.add_argument("config", help="YAML config (model, parallel, runtime, attention, serve; prompt unused)")
    p.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (serve.port, default 8000; 0 = any free port)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set serve.kv_cache_tokens=32768 (repeatable)")
    p.set_defaults(func=main)


def main(args) -> int:
    """``cp-megatron serve``: exit 0 after a drained stop, 2 bad config, 1 a rank failed."""
    from cp_megatron.cli import cli_job
    from cp_megatron.config import load_config
    from cp_megatron.serve import serve

    overrides = list(args.overrides)
    overrides += [f"serve.host={args.host}"] if args.host is not None else []
    overrides += [f"serve.port={args.port}"] if args.port is not None else []
    return cli_job(lambda: serve(load_config(args.config, overrides)))[0]
