"""The `daskdl` command: one module per group of subcommands, `main.py` the entry point."""
