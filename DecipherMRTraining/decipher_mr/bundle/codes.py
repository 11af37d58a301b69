"""Coded concepts for the labels of a segmentation head (DICOM segmented property category and type).

A head's ``labels.csv`` may carry two extra columns, ``category`` and ``type``, each a code triplet
``scheme^value^meaning`` (the form 3D Slicer's terminology entries use), e.g.::

    index,name,category,type
    0,background,,
    1,frontal lobe,SCT^123037004^Anatomical Structure,SCT^83251001^Frontal lobe

The codes come from SNOMED CT as listed by the DICOM standard's CID 7150 family (category CID 7150,
anatomical types CID 7153/7154, morphologically abnormal types CID 7159). Bundles written before the
columns existed stay loadable: :func:`label_codes` looks the label name up in :data:`KNOWN_CODES` and
falls back to Tissue/Tissue, the default of a new segment in 3D Slicer. The same codes go into DICOM
Segmentation objects (:mod:`decipher_mr.inference.dicom_seg`), Slicer segment terminology
(``TerminologyEntry`` tag) and the browser viewer.

>>> label_codes([{"index": 0, "name": "background"}, {"index": 1, "name": "frontal lobe"}])[0].type
('SCT', '83251001', 'Frontal lobe')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

Code = tuple[str, str, str]  # (coding scheme designator, code value, code meaning)

ANATOMY: Code = ("SCT", "123037004", "Anatomical Structure")
ABNORMAL: Code = ("SCT", "49755003", "Morphologically Altered Structure")
TISSUE: Code = ("SCT", "85756007", "Tissue")
DEFAULT_CODES: tuple[Code, Code] = (TISSUE, TISSUE)  # what Slicer gives a segment it knows nothing about

# Label names the demo and typical heads use (lower case, spaces), checked against the codes in
# pydicom's DICOM code dictionary and Slicer 5.10's terminology lists.
KNOWN_CODES: dict[str, tuple[Code, Code]] = {
    "brain": (ANATOMY, ("SCT", "12738006", "Brain")),
    "frontal lobe": (ANATOMY, ("SCT", "83251001", "Frontal lobe")),
    "parietal lobe": (ANATOMY, ("SCT", "16630005", "Parietal lobe")),
    "temporal lobe": (ANATOMY, ("SCT", "78277001", "Temporal lobe")),
    "occipital lobe": (ANATOMY, ("SCT", "31065004", "Occipital lobe")),
    "cerebellum": (ANATOMY, ("SCT", "113305005", "Cerebellum")),
    "brain stem": (ANATOMY, ("SCT", "119238007", "Brain stem")),
    "deep grey matter": (ANATOMY, ("SCT", "389081007", "Gray matter")),
    "grey matter": (ANATOMY, ("SCT", "389081007", "Gray matter")),
    "gray matter": (ANATOMY, ("SCT", "389081007", "Gray matter")),
    "white matter": (ANATOMY, ("SCT", "389080008", "White matter")),
    "ventricle": (ANATOMY, ("SCT", "35764002", "Brain ventricle")),
    "hippocampus": (ANATOMY, ("SCT", "5366008", "Hippocampus")),
    "thalamus": (ANATOMY, ("SCT", "42695009", "Thalamus")),
    "caudate nucleus": (ANATOMY, ("SCT", "11000004", "Caudate nucleus")),
    "putamen": (ANATOMY, ("SCT", "89278009", "Putamen")),
    "spinal cord": (ANATOMY, ("SCT", "2748008", "Spinal cord")),
    "kidney": (ANATOMY, ("SCT", "64033007", "Kidney")),
    "liver": (ANATOMY, ("SCT", "10200004", "Liver")),
    "spleen": (ANATOMY, ("SCT", "78961009", "Spleen")),
    "prostate": (ANATOMY, ("SCT", "41216001", "Prostate")),
    "lesion": (ABNORMAL, ("SCT", "52988006", "Lesion")),
    "mass": (ABNORMAL, ("SCT", "4147007", "Mass")),
    "tumor": (ABNORMAL, ("SCT", "108369006", "Neoplasm")),
    "tumour": (ABNORMAL, ("SCT", "108369006", "Neoplasm")),
    "neoplasm": (ABNORMAL, ("SCT", "108369006", "Neoplasm")),
}
BACKGROUND_NAMES = {"background", "bg", "none", "0"}
CODE_COLUMNS = ("category", "type")


class CodeError(ValueError):
    """A code in a label table is not ``scheme^value^meaning``."""


def format_code(code: Code | None) -> str:
    """``("SCT", "83251001", "Frontal lobe")`` -> ``"SCT^83251001^Frontal lobe"``; None -> ``""``."""
    if not code:
        return ""
    bad = [p for p in code if "^" in p or "~" in p or "\n" in p]
    if bad:
        raise CodeError(f"code part {bad[0]!r} holds a reserved character (^, ~ or a line break)")
    return "^".join(code)


def parse_code(text: str | None, where: str = "label table") -> Code | None:
    """The triplet of ``"scheme^value^meaning"``; an empty cell gives None."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split("^")]
    if len(parts) != 3 or not all(parts):
        raise CodeError(f"{where}: code {text!r} must be 'scheme^value^meaning' with three non-empty parts "
                        "(e.g. 'SCT^83251001^Frontal lobe')")
    return parts[0], parts[1], parts[2]


def is_background(index: int, name: str) -> bool:
    return index == 0 or name.strip().lower() in BACKGROUND_NAMES


def default_codes(name: str) -> tuple[Code, Code]:
    """Category and type for a label name: a known structure, else Tissue/Tissue.

    Side prefixes/suffixes (``left``, ``right``, ``_L``, ``_R``) are ignored for the lookup.
    """
    key = " ".join(name.replace("_", " ").replace("-", " ").lower().split())
    for side in ("left ", "right "):
        key = key[len(side):] if key.startswith(side) else key
    for side in (" l", " r", " left", " right"):
        key = key[: -len(side)] if key.endswith(side) else key
    return KNOWN_CODES.get(key, DEFAULT_CODES)


@dataclass(frozen=True)
class LabelCode:
    """One foreground label with its coded concept (``coded`` is False for a default)."""

    index: int
    name: str
    category: Code
    type: Code
    coded: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "category": format_code(self.category),
                "type": format_code(self.type), "coded": self.coded}


def label_codes(rows: Iterable[Mapping[str, Any]], where: str = "label table",
                keep_background: bool = False) -> list[LabelCode]:
    """Codes for the labels of a head's table (rows of ``labels.csv``), background left out.

    A row's ``category``/``type`` columns win; a row without them (an old bundle) gets
    :func:`default_codes` of its name and ``coded=False``.
    """
    out = []
    for n, row in enumerate(rows):
        index = int(row.get("index", n))
        name = str(row.get("name") or f"label {index}")
        if is_background(index, name) and not keep_background:
            continue
        category = parse_code(row.get("category"), f"{where} row {n} ({name!r}) category")
        ctype = parse_code(row.get("type"), f"{where} row {n} ({name!r}) type")
        if (category is None) != (ctype is None):
            raise CodeError(f"{where} row {n} ({name!r}): give both a category and a type code, or neither")
        if category is None:
            category, ctype = default_codes(name)
            out.append(LabelCode(index, name, category, ctype, coded=False))
        else:
            out.append(LabelCode(index, name, category, ctype))  # type: ignore[arg-type]
    return out


def with_codes(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Label rows with ``category`` and ``type`` columns filled from :func:`default_codes` (empty for the
    background); rows that already carry codes keep them.

    >>> with_codes([{"index": 0, "name": "background"}, {"index": 1, "name": "lesion"}])[1]["type"]
    'SCT^52988006^Lesion'
    """
    out = []
    for n, row in enumerate(rows):
        row = dict(row)
        index, name = int(row.get("index", n)), str(row.get("name", ""))
        if not row.get("category") or not row.get("type"):
            codes = ("", "") if is_background(index, name) else tuple(format_code(c) for c in default_codes(name))
            row["category"], row["type"] = codes
        out.append(row)
    return out


SLICER_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_REGION_CONTEXT = "Anatomic codes - DICOM master list"


def slicer_terminology_entry(category: Code, ctype: Code) -> str:
    """The string 3D Slicer keeps in a segment's ``TerminologyEntry`` tag (vtkSlicerTerminologiesModuleLogic
    serialisation: context~category~type~modifier~region context~region~region modifier).

    >>> slicer_terminology_entry(*DEFAULT_CODES)[:52]
    'Segmentation category and type - DICOM master list~S'
    """
    return "~".join([SLICER_CONTEXT, format_code(category), format_code(ctype), "^^", SLICER_REGION_CONTEXT,
                     "^^", "^^"])


def parse_slicer_terminology_entry(entry: str) -> tuple[Code | None, Code | None]:
    """Category and type of a Slicer ``TerminologyEntry`` string (None where a part is empty)."""
    parts = entry.split("~")
    if len(parts) < 3:
        raise CodeError(f"not a Slicer terminology entry: {entry!r}")
    return parse_code(parts[1] if parts[1].strip("^") else ""), parse_code(parts[2] if parts[2].strip("^") else "")
