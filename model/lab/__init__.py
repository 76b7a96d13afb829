"""The lab: synthetic scenes and clips, the trainer and its recipes, evaluation on the scenes,
probes. It uses the product (``model``); nothing in the product imports it (tests/test_layout.py)."""
