"""DecipherMR Slicer module (placeholder).

The scripted module that loads a DecipherMR model bundle and, on the volume in the viewer, produces a
segmentation, an anomaly heatmap, a text-prompted highlight and report/case retrieval is tracked by a
later issue. This file only declares the module so the extension builds. Nothing heavy is imported here:
Slicer loads every module at start-up.
"""

from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class DecipherMR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DecipherMR"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["DecipherMR developers"]
        self.parent.helpText = (
            "3D MRI vision-language foundation model (research use only, not for clinical use). "
            "The interactive panel is not implemented yet; use the decipher-mr command line."
        )
        self.parent.acknowledgementText = (
            "Re-implements Decipher-MR: A Vision-Language Foundation Model for 3D MRI Representations "
            "(arXiv 2509.21249)."
        )
