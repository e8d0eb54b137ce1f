"""Shared pytest configuration: real Redis servers come from redcurrent's own plugin."""

pytest_plugins = ["redcurrent.testing", "pytester"]
