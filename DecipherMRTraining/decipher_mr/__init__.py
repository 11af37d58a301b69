"""DecipherMR: a 3D MRI vision-language toolkit (research use only, not for clinical use).

Layers follow the data flow: ``data`` → ``models`` → ``train`` → heads → eval → bundle → inference.
"""

__version__ = "0.1.0"
