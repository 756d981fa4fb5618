"""Adapters for other frameworks (DESIGN.md plans a SWE-ReX `ApptainerDeployment` here; none ships yet)."""
