"""The command line: Typer commands that parse flags, call a stage and print. Imported by nothing in the package."""
