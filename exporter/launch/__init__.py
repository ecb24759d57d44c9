"""Launchers execute the sub-stages a stage planned; they never know what a stage does."""

from .interactive import run_interactive

LAUNCHERS = {"interactive": run_interactive}
