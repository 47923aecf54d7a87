"""Keras → phone formats and back. Imports none of the server/devices/widgets packages.

Nothing is imported here: a phone or a Ray worker that needs one runtime loads that
runtime's modules only, not the exporter (its public names are ``xflwb``'s).
"""
