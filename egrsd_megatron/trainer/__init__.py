"""The training loop. Only entry points (cli, recipes) import this package."""
