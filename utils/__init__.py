"""Helpers the PureCC scripts share. Importing the package first silences known-harmless library messages
(utils/quiet.py) before any model library is imported."""

from . import quiet

quiet.install()
