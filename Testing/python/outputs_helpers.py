"""Small real inputs for the output tests (batch infer, BIDS derivatives, DICOM-SEG).

A random-weight bundle (vit-micro, tiny text tower, a coded segmentation head and an anomaly head,
built in a second) and Colin27 (the real T1 head from the Debian package mricron-data) at 4.5 mm, so
the outputs are written from real anatomy in a few hundred milliseconds per volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")
LOBES = ["background", "frontal lobe", "temporal lobe", "cerebellum", "unnamed structure"]


def tiny_bundle(folder: Path, name: str = "tiny-outputs-test", coded: bool = True, relabel=None) -> Path:
    """A bundle with a segmentation head ``lobes`` (labels :data:`LOBES`) and an anomaly head ``lesion``;
    ``relabel(rows) -> rows`` rewrites the segmentation head's label table (e.g. custom codes)."""
    import torch

    from decipher_mr.bundle import HeadExport, write_bundle
    from decipher_mr.data.preprocess import PreprocessConfig
    from decipher_mr.heads import build_head
    from decipher_mr.models.clip import ImageTextModel
    from decipher_mr.models.text import TextTower
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(0)
    vision = build_vision_encoder("vit-micro")
    d, depth = vision.config.embed_dim, vision.config.depth
    model = ImageTextModel(vision, TextTower.from_spec({"tiny": True, "seed": 0})).eval()
    layers = [max(1, depth // 3), max(1, 2 * depth // 3), depth]
    seg = HeadExport.from_head("lobes", build_head("segment", {"embed_dim": d, "labels": LOBES, "layers": layers,
                                                              "channels": 8, "crop": [32, 32, 32]}))
    if not coded:  # a bundle from before label codes: index,name only
        seg.labels = [{"index": r["index"], "name": r["name"]} for r in seg.labels]
    if relabel is not None:
        seg.labels = relabel([dict(r) for r in seg.labels])
    anomaly = HeadExport.from_head("lesion", build_head("anomaly", {"embed_dim": d, "layers": layers, "channels": 8,
                                                                   "crop": [32, 32, 32]}))
    out = Path(folder) / "bundle"
    write_bundle(out, model=model, heads=[seg, anomaly], preprocess=PreprocessConfig(target_spacing=(6.0, 6.0, 6.0)),
                 name=name)
    return out


def colin_small(step: int = 3, oblique: bool = False):
    """Colin27 every ``step``-th voxel (a real head on a coarse grid); ``oblique`` tilts its direction."""
    from decipher_mr.data.io import read_volume

    vol = read_volume(COLIN)
    arr = np.ascontiguousarray(vol.array[::step, ::step, ::step]).astype(np.int16)
    small = vol.with_array(np.zeros(vol.shape, np.int16))
    small.array = arr
    small.spacing = tuple(s * step for s in vol.spacing)
    if oblique:
        a = np.deg2rad(12.0)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        small.direction = rot @ small.direction
    small.path = None
    return small


def write_scanner_series(vol, folder: Path, series_uid: str, description: str = "T1 MPRAGE") -> Path:
    """``vol`` as an MR DICOM series written by SimpleITK with the tags a scanner export carries
    (patient, study, frame of reference, positions): one int16 file per k-slice, shuffled file names."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(vol.to_sitk(), sitk.sitkInt16)
    d = img.GetDirection()
    tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0010|0010": "Colin^Twentyseven",
            "0010|0020": "COLIN27", "0010|0030": "19700101", "0010|0040": "M", "0008|0020": "20260101",
            "0008|0030": "120000", "0008|0050": "ACC0001", "0008|0090": "", "0020|0010": "1",
            "0020|000d": series_uid + ".1", "0020|000e": series_uid, "0020|0011": "3", "0008|103e": description,
            "0020|0052": series_uid + ".2", "0008|0070": "TestVendor", "0018|0050": f"{img.GetSpacing()[2]:.6f}",
            "0018|0088": f"{img.GetSpacing()[2]:.6f}",
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    n = img.GetSize()[2]
    for k in range(n):
        sl = img[:, :, k]
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{100 + k}")
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"IM{(k * 7919) % 100003:06d}"))  # names not in slice order, no suffix
        writer.Execute(sl)
    return folder
