"""The contract (../shared/spec/): wire structs, content addresses and URIs, descriptors, image parts,
token spans and the run directory layout, each check written once.

Imports only ``mmoffload.errors``; every layer above builds on it.
"""
