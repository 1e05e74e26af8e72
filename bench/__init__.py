"""Measuring sdserve: the engines against the PyTorch/diffusers reference on the same weights
(`python -m bench pipeline`), and HTTP load against a server or router (`python -m bench http`).

Every run writes a JSON file, a Markdown table and a PNG chart into its results folder.
"""
