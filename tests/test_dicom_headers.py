"""routing_headers: the routing attributes read from Part-10 bytes without decoding them.

pydicom is the oracle: over every Part-10 file pydicom and pydicom-data ship, the
scanner must say exactly what pydicom reads (or hand the file to pydicom itself).
Hand-built data sets cover what the shipped files lack: undefined-length
sequences and items before the routing attributes, CP-246 ``UN`` sequences,
non-ASCII values, truncation.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from dicom_peers import sample_file
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom import headers as H
from dicom.headers import ROUTING_TAGS, HeaderError, routing_headers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test files

ALLOWED_KEYS = {*ROUTING_TAGS.values(), "TransferSyntaxUID"}
CT_UID = "1.2.840.10008.5.1.4.1.1.2"


def _all_part10_files() -> list[Path]:
    folders = {Path(str(get_testdata_file("CT_small.dcm"))).parent}
    rg1 = get_testdata_file("RG1_J2KR.dcm")
    if rg1:
        folders.add(Path(str(rg1)).parent)
    files = []
    for folder in folders:
        for path in sorted(folder.rglob("*.dcm")):
            with open(path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    files.append(path)
    return files


def test_scanner_agrees_with_pydicom_on_every_shipped_file() -> None:
    files = _all_part10_files()
    assert len(files) > 100, "pydicom's test files should be installed"
    scanned = 0
    for path in files:
        data = path.read_bytes()
        try:
            expected = H._with_pydicom(data)
        except HeaderError:
            continue
        try:
            got = H._scan(data)
        except H._Unsupported:  # handed to pydicom by routing_headers
            assert routing_headers(data) == expected, path.name
            continue
        assert got == expected, path.name
        assert set(got) <= ALLOWED_KEYS
        scanned += 1
    assert scanned > 0.9 * len(files)


def test_radiographs_and_their_transfer_syntaxes() -> None:
    rg1 = routing_headers(sample_file("RG1_J2KR.dcm").read_bytes())
    rg3 = routing_headers(sample_file("RG3_UNCI.dcm").read_bytes())
    assert rg1["Modality"] == rg3["Modality"] == "CR"
    assert rg1["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.1"
    assert rg1["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.90"
    assert rg3["TransferSyntaxUID"] == ExplicitVRLittleEndian
    assert rg3["AccessionNumber"] == "FUJI95706"
    for headers in (rg1, rg3):
        assert headers["StudyInstanceUID"].startswith("1.3.6.1.4.1.5962")
        assert set(headers) <= ALLOWED_KEYS  # never PatientName, PatientID, ...


@pytest.mark.parametrize(
    ("name", "syntax", "modality"),
    [
        ("CT_small.dcm", ExplicitVRLittleEndian, "CT"),
        ("rtplan.dcm", ImplicitVRLittleEndian, "RTPLAN"),
        ("ExplVR_BigEnd.dcm", ExplicitVRBigEndian, "US"),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian, "OT"),
        ("emri_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "MR"),
        ("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5", "OT"),
    ],
)
def test_each_encoding(name: str, syntax: str, modality: str) -> None:
    headers = routing_headers(sample_file(name).read_bytes())
    assert headers["TransferSyntaxUID"] == syntax
    assert headers["Modality"] == modality
    assert headers["SOPInstanceUID"]


# -- hand-built data sets ---------------------------------------------------------------


def _file(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_UID)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT_UID
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.AccessionNumber = "ACC 1 "
    ds.Modality = "CT"
    ds.PatientName = "NGUYEN^VAN A"
    ds.StationName = "Phòng CT số 2"  # Vietnamese station name, UTF-8
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.1"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_undefined_length_sequences_before_the_routing_tags(syntax: str) -> None:
    ds = _dataset()
    inner = Dataset()
    inner.CodeValue = "X"
    inner.CodeMeaning = "nested"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "9.9"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    item.PurposeOfReferenceCodeSequence.is_undefined_length = True
    ds.ReferencedImageSequence = Sequence([item, Dataset()])  # (0008,1140)
    ds.ReferencedImageSequence.is_undefined_length = True
    ds.ProcedureCodeSequence = Sequence([inner])  # (0008,1032)
    data = _file(ds, syntax)
    got = H._scan(data)  # not the fallback
    assert got == H._with_pydicom(data)
    assert got["StationName"] == "Phòng CT số 2"
    assert got["AccessionNumber"] == "ACC 1"
    assert got["BodyPartExamined"] == "CHEST"
    assert "PatientName" not in got


def test_undefined_length_items_inside_an_explicit_un_sequence() -> None:
    """CP-246: an explicit VR 'UN' of undefined length holds implicit VR items."""
    ds = _dataset()
    raw = _file(ds, ExplicitVRLittleEndian)
    # a private UN element of undefined length between groups 0008 and 0018
    item_body = struct.pack("<HHL", 0x0008, 0x1155, 4) + b"1.2\x00"  # implicit VR inside
    un = (
        struct.pack("<HH", 0x0009, 0x1010)
        + b"UN\x00\x00"
        + struct.pack("<L", 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + item_body
        + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    cut = raw.index(b"\x18\x00\x15\x00CS")  # before (0018,0015): tags stay in order
    data = raw[:cut] + un + raw[cut:]
    got = H._scan(data)
    assert got == H._with_pydicom(data)
    assert got["BodyPartExamined"] == "CHEST"


def test_multi_valued_and_padded_values() -> None:
    ds = _dataset()
    ds.StationName = "A\\B"
    got = routing_headers(_file(ds, ExplicitVRLittleEndian))
    assert got["StationName"] == "A\\B"
    assert got["SOPInstanceUID"] == "1.2.3.4.5"  # UI padded with NUL to an even length


def test_missing_attributes_are_absent() -> None:
    ds = Dataset()
    ds.SOPClassUID = CT_UID
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = ""
    got = routing_headers(_file(ds, ExplicitVRLittleEndian))
    assert got == {
        "TransferSyntaxUID": ExplicitVRLittleEndian,
        "SOPClassUID": CT_UID,
        "SOPInstanceUID": "1.2.3.4.5",
    }


def test_not_dicom_and_broken_meta_raise() -> None:
    with pytest.raises(HeaderError):
        routing_headers(b"hello")
    with pytest.raises(HeaderError):
        routing_headers(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00" + b"1.2")


def test_truncated_data_set_is_read_by_pydicom_or_refused() -> None:
    data = sample_file("CT_small.dcm").read_bytes()
    cut = data[: data.index(b"\x08\x00\x60\x00CS") + 5]  # inside the Modality element
    try:
        got = routing_headers(cut)
    except HeaderError:
        return
    assert "Modality" not in got


def test_garbage_data_set_yields_no_instance_uid() -> None:
    meta_end = H._file_meta(sample_file("CT_small.dcm").read_bytes(), 132)[0]
    data = sample_file("CT_small.dcm").read_bytes()[:meta_end] + b"\xff" * 64
    try:
        got = routing_headers(data)
    except HeaderError:
        return
    assert "SOPInstanceUID" not in got


# -- part10_prefix ----------------------------------------------------------------------


@pytest.mark.parametrize("instance", ["1.2.3", "1.2.34"])  # odd and even lengths (padding)
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.90"])
def test_part10_prefix_is_what_pynetdicom_writes(instance: str, syntax: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(CT_UID), sop_instance_uid=UID(instance), transfer_syntax=UID(syntax)
    )
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    got = H.part10_prefix(
        CT_UID, instance, syntax, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    )
    assert got == expected
    body = sample_file("CT_small.dcm").read_bytes()
    offset = H._file_meta(body, 132)[0]
    assert routing_headers(got + body[offset:])["TransferSyntaxUID"] == syntax
