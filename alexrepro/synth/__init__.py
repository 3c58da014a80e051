"""Synthetic downloads in ILSVRC-2012's formats: the built-in miniature sample and the full-count generator."""
