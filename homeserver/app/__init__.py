"""The composition root: command line, start-up, listeners, shutdown."""
