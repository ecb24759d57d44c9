"""Stages plan the work as sub-stages; launchers execute them."""

from . import export

STAGES = {"export": export.plan}
