"""`decipher-mr manifest` on real files: Colin27 (or MNI152) written as a BIDS tree by nibabel and as
DICOM series by SimpleITK, pydicom's real SR/RT objects, nibabel's real Siemens mosaic, and report tables."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("bids")
pydicom = pytest.importorskip("pydicom")

from decipher_mr.cli import main  # noqa: E402
from decipher_mr.data.io import read_volume, write_dicom_series  # noqa: E402
from decipher_mr.data.manifest import read_manifest  # noqa: E402
from decipher_mr.data.volume import Volume  # noqa: E402

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


@pytest.fixture(scope="module")
def real_t1(tmp_path_factory) -> Path:
    """A real T1 head (Colin27, else MNI152) at 6 mm, written as NIfTI by nibabel: small and fast."""
    from nibabel.processing import resample_to_output

    if CH2.exists():
        img = nib.load(CH2)
    else:
        nilearn = pytest.importorskip("nilearn.datasets")
        img = nilearn.load_mni152_template(resolution=2)
    small = resample_to_output(img, voxel_sizes=(6.0, 6.0, 6.0), order=1)
    out = tmp_path_factory.mktemp("t1") / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(small.dataobj).astype(np.int16), small.affine), out)
    return out


def _bids_tree(root: Path, t1: Path) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "colin", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tage\tsplit\nsub-01\t33\ttraining\nsub-02\t40\ttest\n")
    (root / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5, "BodyPart": "BRAIN"}))  # inherited
    img = nib.load(t1)
    for sub, ses in (("01", "1"), ("01", "2"), ("02", None)):
        anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        nib.save(img, anat / f"{stem}_T1w.nii.gz")
        nib.save(img, anat / f"{stem}_acq-fast_FLAIR.nii.gz")
        (anat / f"{stem}_acq-fast_FLAIR.json").write_text(json.dumps({"EchoTime": 0.1, "InversionTime": 2.5}))
    (root / "sub-02" / "anat" / "sub-02_notbids.nii.gz").write_bytes(b"x")  # a bad name, reported
    return root


@pytest.fixture()
def bids_root(tmp_path, real_t1) -> Path:
    return _bids_tree(tmp_path / "ds", real_t1)


def test_bids_dry_run_table_and_manifest(bids_root, tmp_path, capsys):
    assert main(["manifest", str(bids_root), "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert re.search(r"studies\s+3\n", out.out) and re.search(r"series\s+6\n", out.out)
    assert "FLAIR 3, T1w 3" in out.out and "brain 3, unknown 3" in out.out  # BodyPart: T1w.json only
    assert "sub-02_notbids.nii.gz: not a valid BIDS file name" in out.err
    assert not list(tmp_path.glob("*.jsonl"))

    dest = tmp_path / "out" / "manifest.jsonl"
    reports = tmp_path / "reports.tsv"
    reports.write_text("participant_id\tsession_id\tfindings\n01\t1\tNormal brain.\n02\t\tMild atrophy.\n"
                       "sub-09\tses-1\tNobody here.\n")
    assert main(["manifest", str(bids_root), "--out", str(dest), "--no-progress",
                 "--reports", str(reports), "--join-on", "subject,session"]) == 0
    rows = read_manifest(dest)
    assert len(rows) == 6
    by = {r.id: r for r in rows}
    t1 = by["sub-01_ses-1_T1w"]
    assert (t1.sequence, t1.body_region, t1.split, t1.study_id) == ("T1w", "brain", "train", "sub-01_ses-1")
    assert t1.report_text == "Normal brain."
    assert t1.extra["acquisition"]["MagneticFieldStrength"] == 1.5 and t1.extra["participant"]["age"] == "33"
    flair = by["sub-01_ses-2_acq-fast_FLAIR"]
    assert flair.extra["bids"]["acquisition"] == "fast" and flair.extra["acquisition"]["InversionTime"] == 2.5
    assert flair.report_text is None  # no report for session 2
    assert by["sub-02_T1w"].split == "test" and by["sub-02_T1w"].report_text == "Mild atrophy."
    assert not Path(json.loads(dest.read_text(encoding="utf-8").splitlines()[0])["image"]).is_absolute()
    assert read_volume(t1.image).same_geometry(read_volume(bids_root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"))
    assert "Normal brain" not in capsys.readouterr().out  # report text is never printed


def test_not_bids_and_no_out_are_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["manifest", str(tmp_path / "empty"), "--kind", "bids", "--dry-run"]) == 1
    assert "not a BIDS dataset (no dataset_description.json" in capsys.readouterr().err
    assert main(["manifest", str(tmp_path / "empty")]) == 1
    assert "--out" in capsys.readouterr().err


# --- DICOM trees -----------------------------------------------------------------------------
def _write_series(vol: Volume, folder: Path, uid: str, desc: str, tags: dict[str, str]) -> None:
    write_dicom_series(vol, folder, series_uid=uid, description=desc)
    for f in folder.glob("*.dcm"):  # the scanner tags a PACS export carries, set with pydicom
        ds = pydicom.dcmread(f)
        if ds.SeriesInstanceUID != uid:
            continue
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(f)


@pytest.fixture()
def pacs_tree(tmp_path, real_t1) -> Path:
    root = tmp_path / "pacs"
    vol = read_volume(real_t1)
    study = {"StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.55.1", "AccessionNumber": "ACC001"}
    _write_series(vol, root / "patient1" / "study1" / "t1", "1.2.826.0.1.3680043.2.1125.55.2", "T1 MPRAGE SAG",
                  {**study, "BodyPartExamined": "HEAD", "SeriesNumber": "3"})
    # a second series in the SAME folder, named by tags only (TR/TE), body part from the study description
    _write_series(vol, root / "patient1" / "study1" / "t1", "1.2.826.0.1.3680043.2.1125.55.3", "ax 2",
                  {**study, "ScanningSequence": "SE", "RepetitionTime": "4000", "EchoTime": "100", "SeriesNumber": "4",
                   "StudyDescription": "MRI BRAIN W/O"})
    thin = vol.with_array(vol.array.copy())
    thin = Volume(thin.array[:, :, :3].copy(), thin.spacing, thin.origin, thin.direction)
    _write_series(thin, root / "patient1" / "study1" / "loc", "1.2.826.0.1.3680043.2.1125.55.4", "localizer",
                  {**study, "SeriesNumber": "1"})
    _write_series(thin, root / "patient1" / "study1" / "thin", "1.2.826.0.1.3680043.2.1125.55.5", "T2 slab",
                  {**study, "SeriesNumber": "5"})
    other = root / "patient1" / "study1" / "other"
    other.mkdir()
    shutil.copy(PYDICOM_FILES / "test-SR.dcm", other / "sr.dcm")
    shutil.copy(PYDICOM_FILES / "rtplan.dcm", other / "rtplan.dcm")
    (other / "broken.dcm").write_bytes(b"not a dicom file at all")
    (root / "patient1" / "study1" / "report.txt").write_text("Beside report.\n")
    mosaic = root / "patient2" / "dwi"
    mosaic.mkdir(parents=True)
    for name in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"):
        with gzip.open(NICOM_DATA / name) as fi, open(mosaic / name[:-3], "wb") as fo:
            shutil.copyfileobj(fi, fo)
    return root


def test_dicom_tree_groups_skips_and_proposes(pacs_tree, tmp_path, capsys):
    assert main(["manifest", str(pacs_tree), "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert re.search(r"series\s+3\n", out.out)
    assert re.search(r"skipped:\ localiser\s+1\n", out.out) and re.search(r"skipped:\ too\ thin\ to\ be\ a\ volume\s+1\n", out.out)
    assert re.search(r"skipped:\ structured\ report\ \(SR\)\s+1\n", out.out) and "skipped: RT object" in out.out
    assert "broken.dcm: not a DICOM file" in out.err
    assert "T1 MPRAGE SAG" in out.out and "SeriesDescription 'T1 MPRAGE SAG'" in out.out  # shown for review

    reports = tmp_path / "reports.csv"
    reports.write_text('AccessionNumber,report\nACC001,"Line one.\nLine two, with comma."\nACC999,Unmatched.\n')
    dest = tmp_path / "pacs.jsonl"
    assert main(["manifest", str(pacs_tree), "--out", str(dest), "--no-progress",
                 "--reports", str(reports), "--join-on", "AccessionNumber"]) == 0
    rows = read_manifest(dest)
    assert len(rows) == 3
    t1 = next(r for r in rows if r.extra["series_uid"].endswith(".2"))
    t2 = next(r for r in rows if r.extra["series_uid"].endswith(".3"))
    dwi = next(r for r in rows if "mosaic_volumes" in r.extra)
    assert (t1.sequence, t1.body_region) == ("T1w", "brain")
    assert (t2.sequence, t2.body_region) == ("T2w", "brain") and "TR 4000" in t2.extra["proposed_from"]["sequence"]
    assert t1.report_text == "Line one.\nLine two, with comma." and dwi.report_text is None
    assert dwi.sequence == "DWI" and dwi.extra["mosaic_volumes"] == 2
    # the folder holds two series: the row's series_uid picks the right one, as prepare does
    vol = read_volume(t1.image, series_uid=t1.extra["series_uid"])
    assert vol.shape == read_volume(pacs_tree / "patient1/study1/t1", series_uid=t1.extra["series_uid"]).shape


def test_dicom_reports_beside_and_convert(pacs_tree, tmp_path):
    pytest.importorskip("dcm2niix")
    dest = tmp_path / "conv.jsonl"
    assert main(["manifest", str(pacs_tree), "--out", str(dest), "--no-progress", "--reports-beside",
                 "--convert", str(tmp_path / "nifti")]) == 0
    rows = read_manifest(dest)
    t1 = next(r for r in rows if r.extra["series_uid"].endswith(".2"))
    assert t1.image.endswith(".nii.gz") and Path(t1.report).name == "report.txt"
    direct = read_volume(pacs_tree / "patient1/study1/t1", series_uid=t1.extra["series_uid"])
    converted = read_volume(t1.image)
    # dcm2niix may flip the row axis; the voxel grid in space must be the same
    assert converted.shape == direct.shape
    np.testing.assert_allclose(sorted(converted.spacing), sorted(direct.spacing), atol=1e-3)
    assert np.isclose(np.abs(np.linalg.det(converted.affine_lps)), np.abs(np.linalg.det(direct.affine_lps)))


def test_report_table_problems_name_file_and_line(pacs_tree, tmp_path, capsys):
    reports = tmp_path / "reports.jsonl"
    reports.write_text('{"AccessionNumber": "ACC001", "text": "Secret finding."}\n{broken\n'
                       '{"AccessionNumber": "ACC001", "text": "again"}\n')
    assert main(["manifest", str(pacs_tree), "--dry-run", "--no-progress", "--reports", str(reports),
                 "--join-on", "AccessionNumber"]) == 0
    out = capsys.readouterr()
    assert f"{reports}:2: not valid JSON" in out.err and f"{reports}:3: key ACC001 appears twice" in out.err
    assert re.search(r"reports\ matched\s+2\n", out.out)  # both ACC001 series
    assert "Secret finding" not in out.out + out.err
    assert main(["manifest", str(pacs_tree), "--dry-run", "--reports", str(reports)]) == 1
    assert "--join-on" in capsys.readouterr().err
