"""DecipherMR: segmentation, anomaly heatmap, text-prompted highlight and report retrieval on an MRI volume.

This file is the thin Qt layer. Everything that touches the MRML scene lives in ``DecipherMRLib`` (Qt-free,
tested on slicer-core); model work runs in the persistent ``decipher-mr worker`` process, driven off the
GUI thread by ``DecipherMRLib.Runner``. Nothing heavy is imported here or in any constructor: Slicer
imports every module at start-up, and torch/decipher_mr load only when the user runs something.
"""

import logging
from typing import Annotated

import ctk
import qt
import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import vtk

# The choices of the device combo box (DecipherMRLib.PanelInputs.DEVICES; repeated here because the
# parameter node is declared when Slicer imports this file, before DecipherMRLib is on the path).
DEVICE_CHOICES = ["auto", "cpu", "cuda"]


class DecipherMR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DecipherMR"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DecipherMR developers"]
        self.parent.helpText = (
            "Runs a DecipherMR model bundle (3D MRI vision-language foundation model) on the selected volume: "
            "<b>Segment</b> (named, coloured segments), <b>Anomaly map</b> (heatmap over the volume, opacity, "
            "threshold to segment), <b>Text query</b> (a segment and a markup where the text points; Enter runs it), "
            "<b>Similar reports</b> and <b>Find cases</b> (retrieval tables; select a row to read the report). "
            "Model work runs in a background worker process with progress and Cancel; a cancelled or failed "
            "run leaves the scene as it was. Needs 3D Slicer 5.10 or newer (Python 3.10+ for PyTorch); on "
            "an older Slicer the panel says so. Research use only, not for clinical use. "
            '<a href="https://github.com/decipher-mr/SlicerDecipherMR#the-slicer-module">Documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "An open re-implementation of Decipher-MR. If you use it, please cite: "
            "Decipher-MR: A Vision-Language Foundation Model for 3D MRI Representations, arXiv:2509.21249 (2025)."
        )


@parameterNodeWrapper
class DecipherMRParameterNode:
    """What the panel holds. Slicer's GUI connectors refuse a QComboBox bound to a bare ``str`` (it needs
    ``Choice``) and a ctkSliderWidget bound to an unbounded ``float`` (it needs ``WithinRange``); see
    docs/slicer-compatibility.md. The two paths are bound by hand (the connectors map ctkPathLineEdit to
    pathlib types only)."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    bundlePath: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    indexPath: str = ""
    engine: str = "local"
    enginePort: Annotated[int, WithinRange(0, 65535)] = 0
    engineIdentity: str = ""
    remoteCommand: str = ""
    query: str = ""
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class DecipherMRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: the buttons start Logic calls and show what the runner reports."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from DecipherMRLib.Compatibility import unsupported_reason

        reason = unsupported_reason((slicer.app.majorVersion, slicer.app.minorVersion))
        if reason:  # an older Slicer: say why in the panel and build nothing that needs the engine
            label = qt.QLabel(reason)
            label.wordWrap = True
            label.objectName = "unsupportedSlicerLabel"
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DecipherMR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DecipherMRLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(10)  # runs only while a job does: a result is applied within 10 ms
        self._pollTimer.timeout.connect(self.onPoll)
        runner = self.logic.runner
        runner.stateChanged.connect(self.onRunStateChanged)
        runner.progress.connect(self.onProgress)
        runner.finished.connect(self.onFinished)
        runner.failed.connect(self.onFailed)
        runner.cancelled.connect(self.onCancelled)

        # A bundle is a .zip or a folder. No name filters: ctkPathLineEdit turns them into a validator that
        # accepts only the listed extensions (a typed folder would never count as chosen). Browse opens a
        # file dialog (a zip, or a folder's config.json); the Folder button picks a folder.
        self.ui.bundlePathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Dirs
        self.ui.bundlePathLineEdit.nameFilters = []
        self.ui.indexPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.bundlePathLineEdit.currentPathChanged.connect(self.onBundlePathChanged)
        self.ui.indexPathLineEdit.currentPathChanged.connect(lambda path: self._setPath("indexPath", path))
        self.ui.engineIdentityLineEdit.currentPathChanged.connect(lambda path: self._setPath("engineIdentity", path))
        self.ui.engineIdentityLineEdit.validInputChanged.connect(lambda valid: self._clearIfEmpty("engineIdentity", self.ui.engineIdentityLineEdit))
        self.ui.connectButton.clicked.connect(lambda: self._run(lambda p: self.logic.connect()))
        # currentPathChanged is emitted for acceptable text only, and empty text is never acceptable: a
        # path edit emptied by the user reports it through validInputChanged.
        self.ui.bundlePathLineEdit.validInputChanged.connect(lambda valid: self._clearIfEmpty("bundlePath", self.ui.bundlePathLineEdit))
        self.ui.indexPathLineEdit.validInputChanged.connect(lambda valid: self._clearIfEmpty("indexPath", self.ui.indexPathLineEdit))
        self.ui.bundleFolderButton.clicked.connect(self.onChooseBundleFolder)
        self.ui.resultsTableView.setMRMLScene(slicer.mrmlScene)
        # qMRMLTableView keeps one model for every table node it shows, so this connection is made once.
        self.ui.resultsTableView.selectionModel().currentRowChanged.connect(self.onResultSelected)

        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.anomalyButton.clicked.connect(self.onAnomaly)
        self.ui.thresholdToSegmentButton.clicked.connect(self.onThresholdToSegment)
        self.ui.opacitySlider.valueChanged.connect(self.onOpacityChanged)
        self.ui.queryButton.clicked.connect(self.onQuery)
        self.ui.queryLineEdit.returnPressed.connect(self.onQuery)
        self.ui.similarReportsButton.clicked.connect(self.onSimilarReports)
        self.ui.findCasesButton.clicked.connect(self.onFindCases)
        self.ui.findCasesLineEdit.returnPressed.connect(self.onFindCases)
        self.ui.loadCaseButton.clicked.connect(self.onLoadCase)
        self.ui.cancelButton.clicked.connect(self.logic.runner.cancel)
        self.ui.dependenciesButton.clicked.connect(self.onDependencies)
        self.ui.openModelsFolderButton.clicked.connect(self.onOpenModelsFolder)
        self.ui.clearModelsFolderButton.clicked.connect(self.onClearModelsFolder)
        for button in (self.ui.dependenciesButton, self.ui.openModelsFolderButton, self.ui.clearModelsFolderButton):
            button.enabled = True

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.logic is not None:
            self.rememberInputs()
            self.logic.shutdown()

    def enter(self):
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self.rememberInputs()
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.bundlePath:
            # All remembered values go in before the panel is connected: no observer runs in between.
            from DecipherMRLib.PanelInputs import remembered_inputs

            for name, value in remembered_inputs(qt.QSettings()).items():
                setattr(parameterNode, name, value)
        if not parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                parameterNode.inputVolume = first
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.bundlePathLineEdit.currentPath = self._parameterNode.bundlePath
            self.ui.indexPathLineEdit.currentPath = self._parameterNode.indexPath
            self.ui.engineIdentityLineEdit.currentPath = self._parameterNode.engineIdentity
            self.updateButtons()

    def rememberInputs(self):
        """Remember the bundle, device and index for the next session (on a run and on leaving the module)."""
        if self._parameterNode is None or not self._parameterNode.bundlePath:
            return
        from DecipherMRLib.PanelInputs import remember_inputs

        p = self._parameterNode
        names = ("bundlePath", "device", "indexPath", "engine", "enginePort", "engineIdentity", "remoteCommand")
        remember_inputs(qt.QSettings(), {name: getattr(p, name) for name in names})

    def _setPath(self, name, path):
        if self._parameterNode and getattr(self._parameterNode, name) != path:
            setattr(self._parameterNode, name, path)

    def _clearIfEmpty(self, name, pathLineEdit):
        if not pathLineEdit.currentPath.strip():
            self._setPath(name, "")

    def onBundlePathChanged(self, path):
        from DecipherMRLib.PanelInputs import bundle_location

        location = bundle_location(path, remote=self.logic.isRemoteEngine(getattr(self._parameterNode, "engine", "")))
        if location != path:  # a folder's config.json was picked: the bundle is the folder
            self.ui.bundlePathLineEdit.currentPath = location
            return
        self._setPath("bundlePath", location)

    def onChooseBundleFolder(self):
        start = self._parameterNode.bundlePath if self._parameterNode else ""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a DecipherMR bundle folder", start)
        if folder:
            self.ui.bundlePathLineEdit.currentPath = folder

    def updateButtons(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        idle = not self.logic.runner.busy
        ready = idle and bool(p.inputVolume and p.bundlePath)
        self.ui.segmentButton.enabled = ready
        self.ui.anomalyButton.enabled = ready
        self.ui.queryButton.enabled = ready and bool(p.query.strip())
        self.ui.similarReportsButton.enabled = ready and bool(p.indexPath)
        self.ui.findCasesButton.enabled = idle and bool(p.bundlePath and p.indexPath)
        self.ui.connectButton.enabled = idle and bool(p.bundlePath)
        self.ui.thresholdToSegmentButton.enabled = idle and self.logic.lastHeatmap is not None
        self.ui.loadCaseButton.enabled = idle and self.logic.lastTable is not None
        self.ui.cancelButton.enabled = self.logic.runner.state.value == "running"
    # --- runs -------------------------------------------------------------------------------
    def _run(self, start):
        if not self.logic.dependenciesReady(getattr(self._parameterNode, "engine", "") or "local") and not self.onDependencies():
            return
        try:
            p = self._parameterNode
            self.logic.configure(p.bundlePath, p.device, index=p.indexPath or None, engine=p.engine or "local", port=p.enginePort or None,
                                 identity=p.engineIdentity or None, remote_command=p.remoteCommand or None)
            self.rememberInputs()
            start(p)
        except Exception as exc:
            logging.exception("DecipherMR could not start")
            slicer.util.errorDisplay(f"DecipherMR could not start: {exc}")
            return
        self._pollTimer.start()

    def onSegment(self):
        self._run(lambda p: self.logic.segment(p.inputVolume))

    def onAnomaly(self):
        self._run(lambda p: self.logic.anomaly(p.inputVolume, opacity=p.opacity))

    def onQuery(self):
        if self.ui.queryButton.enabled:
            self._run(lambda p: self.logic.query(p.inputVolume, p.query))

    def onSimilarReports(self):
        self._run(lambda p: self.logic.similarReports(p.inputVolume))

    def onFindCases(self):
        text = self.ui.findCasesLineEdit.text.strip()
        if text and self.ui.findCasesButton.enabled:
            self._run(lambda p: self.logic.findCases(text, p.inputVolume))

    def onThresholdToSegment(self):
        self.logic.thresholdToSegment(self._parameterNode.inputVolume, self._parameterNode.threshold)

    def onOpacityChanged(self, value):
        self.logic.setOpacity(value)

    def onLoadCase(self):
        row = self.ui.resultsTableView.currentIndex().row()
        if row < 0:
            slicer.util.infoDisplay("Select a row of the results table first.")
            return
        with slicer.util.tryWithErrorDisplay("Could not load the case.", waitCursor=True):
            node = self.logic.loadCase(row)
            slicer.util.setSliceViewerLayers(background=node, fit=True)

    def onResultSelected(self, current, previous=None):
        if self.logic.lastTable is not None and current.row() >= 0:
            self.ui.reportTextBrowser.setPlainText(self.logic.reportOfRow(current.row()))

    # --- runner feedback (always on the GUI thread: the timer polls) ---------------------------
    def onPoll(self):
        if not self.logic.runner.poll():
            self._pollTimer.stop()

    def onRunStateChanged(self, state):
        running = state.value != "idle"
        self.ui.progressBar.visible = running
        self.ui.cancelButton.text = "Cancelling…" if state.value == "cancelling" else "Cancel"
        if running:
            self.ui.progressBar.value = 0
        self.updateButtons()

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def showEngineInfo(self):  # what the (maybe remote) engine loaded: name, fingerprint, device, GPU
        from DecipherMRLib.PanelInputs import engine_summary
        self.ui.engineInfoLabel.text = engine_summary(self.logic.engineInfo(), (self._parameterNode.engine if self._parameterNode else "") or "local")

    def onFinished(self, name, result):
        self.ui.statusLabel.text = f"{name}: done."
        self.showEngineInfo()
        if self.logic.lastTable is not None and name in ("similar reports", "find cases"):
            self.ui.resultsTableView.setMRMLTableNode(self.logic.lastTable)
            for column in (4, 5):  # the full report and image path are shown on selection, not as columns
                self.ui.resultsTableView.setColumnHidden(column, True)
            self.ui.retrievalCollapsibleButton.collapsed = False
        self.updateButtons()

    def onFailed(self, name, message, details):
        self.ui.statusLabel.text = f"{name} failed; the scene was left as it was."
        self.showEngineInfo()
        slicer.util.errorDisplay(f"DecipherMR {name} failed: {message}", detailedText=details)

    def onCancelled(self, name):
        self.ui.statusLabel.text = f"{name} cancelled; the scene was left as it was."

    # --- dependencies and models folder ---------------------------------------------------------
    def onDependencies(self):
        """Show, once, everything that would be installed (pip's own dry run of the same command); install
        only after the user agrees. Returns True when everything is there."""
        from DecipherMRLib.Dependencies import install, plan_install

        torchLogic = self.logic.pytorchExtensionLogic()
        with slicer.util.WaitCursor():  # pip's dry run asks the package index: a few seconds
            plan = plan_install(pytorch_extension=torchLogic is not None)
        if plan.problem:  # the package copy is not found, or this Slicer is too old
            slicer.util.errorDisplay(plan.problem, windowTitle="DecipherMR dependencies")
            return False
        if not plan.missing:
            self.ui.statusLabel.text = plan.text()
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.text(), "DecipherMR dependencies"):
            return False
        try:
            # tryWithErrorDisplay shows the error and re-raises it: the except below turns it into False.
            with slicer.util.tryWithErrorDisplay("Installing DecipherMR's dependencies failed.", waitCursor=True):
                install(plan, slicer.util.pip_install, torchLogic.installTorch if torchLogic else None)
        except Exception:
            logging.exception("DecipherMR: installing dependencies failed")
            self.ui.statusLabel.text = "Installing the dependencies failed; nothing else was changed."
            return False
        self.ui.statusLabel.text = "Dependencies installed."
        return True

    def onOpenModelsFolder(self):
        from DecipherMRLib.ModelsFolder import models_folder

        folder = models_folder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearModelsFolder(self):
        from DecipherMRLib.ModelsFolder import clear_models_folder, models_folder, models_folder_size

        size = models_folder_size() / 2**20
        if slicer.util.confirmOkCancelDisplay(f"Delete the unpacked bundles in {models_folder()} ({size:.0f} MiB)?"):
            self.logic.shutdown()  # the worker may hold files of an unpacked bundle open
            self.ui.statusLabel.text = f"Removed {clear_models_folder()} unpacked bundle(s)."


class DecipherMRLogic(ScriptedLoadableModuleLogic):
    """Thin: passes the scene to DecipherMRLib and the work to the persistent engine worker.

    In Slicer's Python console::

        logic = slicer.util.getModuleLogic("DecipherMR")
        logic.configure("/data/decipher-demo-bundle.zip", "auto")
        logic.segment(slicer.util.getNode("MRHead")); logic.runner.wait()
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from DecipherMRLib.ModuleLogic import ModuleLogic

        self.core = ModuleLogic(slicer.mrmlScene)

    def __getattr__(self, name):
        # Everything else (segment, anomaly, query, runner, lastTable, ...) is DecipherMRLib's.
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)

    def getParameterNode(self):
        return DecipherMRParameterNode(super().getParameterNode())

    def pytorchExtensionLogic(self):
        """The PyTorch extension's logic when that extension is installed (it installs a fitting torch)."""
        try:
            import PyTorchUtils

            return PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            return None


class DecipherMRTest(ScriptedLoadableModuleTest):
    """Self-test in the application (registered with ``slicer_add_python_unittest``): the panel builds,
    accepts a volume and a bundle folder and enables its buttons; the Qt-free core writes segments and a
    heatmap on an oblique phantom. Offline and quick (no download, no model run).

    The full suites (real Colin27, a trained bundle, the worker) run with pytest: see the README.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_enables_its_buttons_for_a_volume_and_a_bundle_folder()
        self.setUp()
        self.test_core_writes_segments_and_heatmap_on_an_oblique_volume()

    def test_panel_enables_its_buttons_for_a_volume_and_a_bundle_folder(self):
        import json
        import tempfile
        from pathlib import Path

        self.delayDisplay("Building the DecipherMR panel")
        slicer.util.selectModule("DecipherMR")  # builds the widget (setup) and enters it
        widget = slicer.util.getModuleWidget("DecipherMR")
        if widget.ui is None:  # an unsupported Slicer: the panel shows why, and that is all it may do
            self.delayDisplay("Slicer too old for DecipherMR: the panel shows the reason")
            return
        ui = widget.ui
        self.assertFalse(ui.segmentButton.enabled)
        self.assertEqual([ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)], DEVICE_CHOICES)

        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "panel test volume")
        ui.inputVolumeSelector.setCurrentNode(volume)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps({"format_version": 1}))
            ui.bundlePathLineEdit.currentPath = folder  # a folder is a bundle: no validator may refuse it
            self.assertEqual(widget._parameterNode.bundlePath, folder)
            self.assertTrue(ui.segmentButton.enabled)
            self.assertTrue(ui.anomalyButton.enabled)
            self.assertFalse(ui.queryButton.enabled)
            ui.queryLineEdit.text = "left frontal lobe"
            self.assertTrue(ui.queryButton.enabled)
            ui.deviceComboBox.currentIndex = DEVICE_CHOICES.index("cpu")
            self.assertEqual(widget._parameterNode.device, "cpu")
            ui.opacitySlider.value = 0.25
            self.assertAlmostEqual(widget._parameterNode.opacity, 0.25)
            ui.bundlePathLineEdit.currentPath = str(Path(folder) / "config.json")  # picked with browse
            self.assertEqual(widget._parameterNode.bundlePath, folder)
            ui.bundlePathLineEdit.currentPath = ""  # emptied: the bundle is no longer chosen
            self.assertEqual(widget._parameterNode.bundlePath, "")
            self.assertFalse(ui.segmentButton.enabled)
        self.delayDisplay("DecipherMR panel test passed")

    def test_core_writes_segments_and_heatmap_on_an_oblique_volume(self):
        import numpy as np
        from DecipherMRLib import SegmentLabel, add_volume_from_array, array_from_volume_node, same_geometry, write_heatmap, write_segmentation

        self.delayDisplay("Building an oblique phantom")
        carrier = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "carrier")
        carrier.SetIJKToRASDirections(0.8, -0.6, 0, 0.6, 0.8, 0, 0, 0, 1)
        carrier.SetSpacing(1.0, 1.0, 2.5)
        grid = np.indices((48, 52, 40)).astype("float32")
        phantom = np.exp(-((grid - np.array([24, 26, 20])[:, None, None, None]) ** 2).sum(0) / 200.0)
        from DecipherMRLib.VolumeBridge import vtk_image_from_array

        carrier.SetAndObserveImageData(vtk_image_from_array(phantom))
        volume = add_volume_from_array(slicer.mrmlScene, phantom, carrier, "phantom")
        labels = (array_from_volume_node(volume) > 0.5).astype(np.uint8)
        seg = write_segmentation(slicer.mrmlScene, volume, labels, [SegmentLabel(1, "core", (1.0, 0.6, 0.0))])
        self.assertEqual(seg.GetSegmentation().GetNthSegment(0).GetName(), "core")
        heat = write_heatmap(slicer.mrmlScene, volume, phantom, "phantom heat")
        self.assertTrue(same_geometry(heat, volume))
        self.delayDisplay("DecipherMR core test passed")
