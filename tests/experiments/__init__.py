"""Experiments for deploy/design/scale-out.md: scripts run by hand against a real broker.

Named ``exp_*.py`` so that pytest (``test_*.py``) never collects them. See exp_common.py.
"""
