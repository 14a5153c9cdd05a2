"""One module per `kvlab` subcommand; see kvlab/cli.py."""
