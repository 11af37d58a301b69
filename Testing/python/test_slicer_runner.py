"""The module's runner (Idle -> Running -> Cancelling) and the models folder.

The dependency check and install are tested in test_slicer_dependencies.py.

Jobs here are real work on real data (reading Colin27, building a heatmap) on a real background thread;
results land in a real MRML scene through the same all-or-nothing path the panel uses.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DecipherMR"))

from DecipherMRLib import array_from_volume_node, write_heatmap  # noqa: E402
from DecipherMRLib.ModelsFolder import clear_models_folder, models_folder  # noqa: E402
from DecipherMRLib.Runner import InferenceRunner, RunState  # noqa: E402
from decipher_mr import assets  # noqa: E402
from slicer_scenes import add_colin27  # noqa: E402


def colin_scene():
    scene = slicer.vtkMRMLScene()
    node = add_colin27(scene)
    return scene, node


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def brightness_map(progress, cancel):
    """Real work: read Colin27 from disk and turn it into a [0, 1] map slab by slab."""
    from decipher_mr.data.io import read_volume

    vol = read_volume(assets.colin27_t1())
    out = np.empty(vol.shape, np.float32)
    for k in range(vol.shape[2]):
        if cancel.is_set():
            raise RuntimeError("stopped on request")
        out[:, :, k] = vol.array[:, :, k] / 255.0
        progress((k + 1) / vol.shape[2], f"slab {k + 1}")
    return out


class Recorder:
    def __init__(self, runner: InferenceRunner):
        self.events: list[tuple] = []
        runner.stateChanged.connect(lambda s: self.events.append(("state", s)))
        runner.progress.connect(lambda f, m: self.events.append(("progress", f)))
        runner.finished.connect(lambda n, r: self.events.append(("finished", n)))
        runner.failed.connect(lambda n, m, d: self.events.append(("failed", n, m)))
        runner.cancelled.connect(lambda n: self.events.append(("cancelled", n)))

    def kinds(self):
        return [e[0] for e in self.events]

    def states(self):
        return [e[1] for e in self.events if e[0] == "state"]


def test_a_job_runs_off_the_calling_thread_reports_progress_and_applies_its_result():
    scene, t1 = colin_scene()
    runner = InferenceRunner(scene)
    seen = Recorder(runner)
    threads = []

    def work(progress, cancel):
        threads.append(threading.current_thread())
        return brightness_map(progress, cancel)

    applied = []
    runner.start("anomaly map", work, apply=lambda heat: applied.append(write_heatmap(scene, t1, heat, "heat")))
    assert runner.state is RunState.RUNNING
    with pytest.raises(RuntimeError, match="busy"):
        runner.start("second", work)
    assert runner.wait(timeout=120) is RunState.IDLE
    assert threads and threads[0] is not threading.current_thread()
    assert seen.states() == [RunState.RUNNING, RunState.IDLE]
    progress = [e[1] for e in seen.events if e[0] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert seen.kinds()[-1] == "finished"
    np.testing.assert_allclose(array_from_volume_node(applied[0]), array_from_volume_node(t1) / 255.0, rtol=1e-6)


def test_cancel_goes_through_cancelling_and_leaves_the_scene_untouched():
    scene, t1 = colin_scene()
    before = node_count(scene)
    runner = InferenceRunner(scene)
    seen = Recorder(runner)
    started = threading.Event()
    cancel_hook = []

    def slow(progress, cancel):
        started.set()
        while not cancel.is_set():
            progress(0.1, "waiting")
            time.sleep(0.01)
        raise RuntimeError("worker stopped")

    runner.start("segment", slow, apply=lambda r: write_heatmap(scene, t1, r, "never"), on_cancel=lambda: cancel_hook.append(1))
    assert started.wait(30)
    runner.cancel()
    assert runner.state is RunState.CANCELLING and cancel_hook == [1]
    runner.wait(timeout=30)
    assert seen.states() == [RunState.RUNNING, RunState.CANCELLING, RunState.IDLE]
    assert seen.kinds()[-1] == "cancelled" and "failed" not in seen.kinds()
    assert node_count(scene) == before


def test_a_result_that_arrives_after_cancel_is_dropped():
    scene, t1 = colin_scene()
    before = node_count(scene)
    runner = InferenceRunner(scene)
    release = threading.Event()

    def finishes_anyway(progress, cancel):
        release.wait(30)
        return brightness_map(progress, threading.Event())

    runner.start("anomaly map", finishes_anyway, apply=lambda r: write_heatmap(scene, t1, r, "late"))
    runner.cancel()
    release.set()
    seen = Recorder(runner)
    runner.wait(timeout=120)
    assert seen.kinds()[-1] == "cancelled"
    assert node_count(scene) == before


def test_a_failing_job_or_a_failing_apply_reports_a_clear_error_and_rolls_back():
    scene, t1 = colin_scene()
    before = node_count(scene)
    runner = InferenceRunner(scene)
    seen = Recorder(runner)

    def missing_file(progress, cancel):
        from decipher_mr.data.io import read_volume

        return read_volume("/nonexistent/scan.nii.gz")

    runner.start("segment", missing_file)
    runner.wait(timeout=30)
    failure = [e for e in seen.events if e[0] == "failed"][-1]
    assert "scan.nii.gz" in failure[2]

    def half_applied(heat):
        write_heatmap(scene, t1, heat, "first part")
        write_heatmap(scene, t1, heat[:10], "wrong grid")  # raises: shape differs from Colin27

    runner.start("anomaly map", brightness_map, apply=half_applied)
    runner.wait(timeout=120)
    assert seen.kinds()[-1] == "failed" and "Colin27" in seen.events[-1][2]
    assert node_count(scene) == before
    assert runner.state is RunState.IDLE


def test_models_folder_follows_the_bundle_cache_rule_and_clears_only_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("DECIPHER_MR_CACHE", str(tmp_path / "cache"))
    from decipher_mr.bundle.archive import bundle_cache_root

    assert models_folder() == bundle_cache_root()
    outside = tmp_path / "keep.txt"
    outside.write_text("not a bundle")
    (models_folder() / "abc123").mkdir(parents=True)
    (models_folder() / "abc123" / "config.json").write_text("{}")
    (models_folder() / "link").symlink_to(tmp_path)
    assert clear_models_folder() == 2
    assert list(models_folder().iterdir()) == [] and outside.exists()
