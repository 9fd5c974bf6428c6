"""The ``dicom-coerce`` route step: only the named elements change, pixel data and the
original stay byte-exact, and the route forwards the coerced copy only."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pytest
from peers.orthanc import sample_file
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom import coerce
from drivers import folder
from gateway.config import parse_config
from gateway.envelope import Envelope, StoredEnvelope
from gateway.errors import ConfigError, PermanentError
from gateway.registry import Registry
from gateway.service import Gateway

PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
FILES = [
    "CT_small.dcm",  # explicit VR LE
    "RG1_J2KR.dcm",  # JPEG 2000 lossless radiograph, several MB
    "MR_small_RLE.dcm",  # RLE
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS
]


def stored(path: Path, *, body: bytes | None = None) -> StoredEnvelope:
    return StoredEnvelope(
        id="0" * 31 + "1",
        seq=1,
        kind="dicom",
        source="modalities",
        headers={"Modality": "CT", "StationName": "CT01"},
        idem_key="1.2.3",
        parent_id=None,
        received_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        body=path.read_bytes() if body is None else body,
        blob_path=path,
    )


def step(**params: object) -> coerce.CoerceStep:
    return coerce.CoerceStep(coerce.CoerceParams.model_validate(params), "lc")


def elements(ds: Dataset) -> dict[int, object]:
    return {int(e.tag): e.value for e in ds}


@pytest.mark.parametrize("name", FILES)
async def test_only_named_elements_change_and_pixels_stay_byte_exact(name: str) -> None:
    path = sample_file(name)
    original = path.read_bytes()
    out = await step(set={"InstitutionName": "Lao Cai GH"}, prefix={"PatientID": "LC-"}).run(
        stored(path)
    )
    assert len(out) == 1
    copy = out[0]
    assert isinstance(copy, Envelope)
    assert copy.kind == "dicom" and copy.as_file and copy.parent_id == "0" * 31 + "1"
    before, after = dcmread(BytesIO(original)), dcmread(BytesIO(copy.body))
    has_id = bool(before.get("PatientID"))  # an empty PatientID takes no prefix
    assert copy.headers == {
        "Modality": "CT",
        "StationName": "CT01",
        "coerced": "InstitutionName,PatientID" if has_id else "InstitutionName",
    }
    assert after.InstitutionName == "Lao Cai GH"
    assert after.PatientID == ("LC-" if has_id else "") + before.PatientID
    a, b = elements(before), elements(after)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert changed == ({0x00080080, 0x00100020} if has_id else {0x00080080})
    # same transfer syntax and file meta (the group length aside)
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert {e.tag: e.value for e in after.file_meta if e.tag != 0x00020000} == {
        e.tag: e.value for e in before.file_meta if e.tag != 0x00020000
    }
    # pixel data is the file's last element: its encoded bytes are identical
    assert original[original.rfind(PIXEL_TAG) :] == copy.body[copy.body.rfind(PIXEL_TAG) :]
    assert before.PixelData == after.PixelData
    assert path.read_bytes() == original  # the input was not touched


async def test_reads_the_blob_when_the_body_is_not_loaded() -> None:
    path = sample_file("CT_small.dcm")
    out = await step(set={"StationName": "CT02"}).run(stored(path, body=b""))
    assert dcmread(BytesIO(out[0].body)).StationName == "CT02"
    assert out[0].headers["StationName"] == "CT02"  # a header that mirrors it follows


async def test_nothing_to_change_passes_the_original_on() -> None:
    path = sample_file("CT_small.dcm")
    ds = dcmread(path)
    env = stored(path)
    # same value already, and a prefix that is already there: idempotent
    out = await step(
        set={"InstitutionName": str(ds.InstitutionName)}, prefix={"PatientID": ds.PatientID[:2]}
    ).run(env)
    assert out == [env]


async def test_prefix_on_a_missing_element_adds_nothing() -> None:
    path = sample_file("CT_small.dcm")
    out = await step(prefix={"OtherPatientIDs": "LC-"}).run(stored(path))
    assert len(out) == 1 and isinstance(out[0], StoredEnvelope)


async def test_non_latin_value_switches_the_copy_to_utf8() -> None:
    path = sample_file("CT_small.dcm")  # ISO_IR 100
    out = await step(set={"InstitutionName": "Bệnh viện Đa khoa Lào Cai"}).run(stored(path))
    copy = out[0]
    assert copy.headers["coerced"] == "InstitutionName,SpecificCharacterSet"
    before, after = dcmread(path), dcmread(BytesIO(copy.body))
    assert after.SpecificCharacterSet == "ISO_IR 192"
    assert after.InstitutionName == "Bệnh viện Đa khoa Lào Cai"
    assert str(after.PatientName) == str(before.PatientName)
    assert after.PixelData == before.PixelData


async def test_record_original_adds_an_original_attributes_item_deterministically() -> None:
    path = sample_file("CT_small.dcm")
    s = step(
        set={"InstitutionName": "Lao Cai GH"}, prefix={"PatientID": "LC-"}, record_original=True
    )
    first, second = await s.run(stored(path)), await s.run(stored(path))
    assert first[0].body == second[0].body  # a re-run yields the same bytes
    ds = dcmread(BytesIO(first[0].body))
    item = ds.OriginalAttributesSequence[-1]
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "medgw lc"
    assert item.AttributeModificationDateTime == "20240506070809.123456+0000"
    previous = item.ModifiedAttributesSequence[0]
    original = dcmread(path)
    assert previous.InstitutionName == original.InstitutionName
    assert previous.PatientID == original.PatientID


async def test_not_dicom_is_permanent_and_other_kinds_pass(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    with pytest.raises(PermanentError):
        await step(set={"StationName": "X"}).run(stored(bad))
    hl7 = Envelope(kind="hl7", source="his", body=b"MSH|^~\\&|")
    assert await step(set={"StationName": "X"}).run(hl7) == [hl7]


# -- configuration ---------------------------------------------------------------------


def registry() -> Registry:
    reg = Registry()
    folder.register(reg)
    coerce.register(reg)
    return reg


def config(tmp_path: Path, steps: str, extra_routes: str = "") -> str:
    return f"""
site: {{id: lc}}
state_dir: {tmp_path / "state"}
http: {{listen: null}}
journal: {{min_free_mb: 0}}
destinations:
  - {{id: pacs, type: folder, path: {tmp_path / "pacs"}}}
  - {{id: archive, type: folder, path: {tmp_path / "archive"}}}
routes:
  - {{id: coerce, match: {{kind: dicom}}, steps: [{steps}], to: [pacs]}}
{extra_routes}"""


@pytest.mark.parametrize(
    ("step_text", "message"),
    [
        ("{dicom-coerce: {set: {InstitutionNme: X}}}", "'InstitutionNme' is not a DICOM keyword"),
        ("{dicom-coerce: {set: {SOPInstanceUID: '1.2'}}}", "SOPInstanceUID cannot be coerced"),
        ("{dicom-coerce: {set: {PixelData: x}}}", "PixelData cannot be coerced"),
        ("{dicom-coerce: {set: {StudyDate: '2024-01-01'}}}", "StudyDate: Invalid value for VR DA"),
        ("{dicom-coerce: {set: {Rows: many}}}", "Rows (VR US) takes a number"),
        ("{dicom-coerce: {prefix: {Rows: 'x'}}}", "Rows (VR US) is not text"),
        ("{dicom-coerce: {prefix: {PatientID: ''}}}", "the prefix for PatientID is empty"),
        ("{dicom-coerce: {set: {PatientID: a}, prefix: {PatientID: b}}}", "both set and prefixed"),
        ("{dicom-coerce: {sett: {PatientID: a}}}", "unknown setting"),
    ],
)
def test_bad_parameters_are_config_errors(tmp_path: Path, step_text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config(tmp_path, step_text), registry())
    text = "\n".join(err.value.problems)
    assert "routes[0].steps[0].dicom-coerce" in text
    assert message in text


def test_good_parameters_parse(tmp_path: Path) -> None:
    cfg = parse_config(
        config(
            tmp_path,
            "{dicom-coerce: {set: {InstitutionName: Lao Cai GH, InstanceNumber: 7}, "
            "prefix: {PatientID: 'LC-'}}}",
        ),
        registry(),
    )
    params = cfg.routes[0].steps[0].params
    assert isinstance(params, coerce.CoerceParams)
    assert params.set_ == {"InstitutionName": "Lao Cai GH", "InstanceNumber": "7"}
    assert params.prefix == {"PatientID": "LC-"}


# -- through the gateway ---------------------------------------------------------------


async def test_route_forwards_only_the_coerced_copy_and_keeps_the_original(
    tmp_path: Path,
) -> None:
    routes = "  - {match: {kind: dicom}, to: [archive]}\n"
    text = config(
        tmp_path,
        "{dicom-coerce: {set: {InstitutionName: Lao Cai GH}, prefix: {PatientID: 'LC-'}}}",
        routes,
    )
    gw = Gateway(parse_config(text, registry()), registry())
    paths = [sample_file(n) for n in ("CT_small.dcm", "RG1_J2KR.dcm")]
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 5)
    try:
        for p in paths:
            ds = dcmread(p, stop_before_pixels=True)
            await gw.accept(
                Envelope(
                    kind="dicom",
                    source="modalities",
                    body=p.read_bytes(),
                    headers={"Modality": ds.Modality},
                    idem_key=ds.SOPInstanceUID,
                    as_file=True,
                )
            )
        pacs, archive = tmp_path / "pacs", tmp_path / "archive"

        def done() -> bool:
            return (
                pacs.exists()
                and archive.exists()
                and len(list(pacs.iterdir())) == 2
                and len(list(archive.iterdir())) == 2
            )

        async with asyncio.timeout(20):
            while not done():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    originals = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    archived = {hashlib.sha256(f.read_bytes()).hexdigest() for f in archive.iterdir()}
    assert archived == originals  # the other route got the originals, byte-exact
    for f in pacs.iterdir():  # the PACS route got coerced copies only
        ds = dcmread(f)
        assert ds.InstitutionName == "Lao Cai GH"
        assert ds.PatientID.startswith("LC-")
    with closing(sqlite3.connect(tmp_path / "state" / "journal.sqlite")) as conn:
        rows = conn.execute(
            "SELECT e.id, e.parent_id, e.digest, e.headers, e.blob, "
            "group_concat(d.destination || '=' || d.state) FROM envelopes e "
            "JOIN deliveries d ON d.seq = e.seq GROUP BY e.seq ORDER BY e.seq"
        ).fetchall()
    assert len(rows) == 4
    by_id = {r[0]: r for r in rows}
    origs = [r for r in rows if r[1] is None]
    copies = [r for r in rows if r[1] is not None]
    assert {r[2] for r in origs} == originals  # the journal keeps the originals byte-exact
    for r in origs:
        assert sorted(r[5].split(",")) == ["archive=done", "steps:coerce=done"]
        blob = tmp_path / "state" / "blobs" / r[4]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == r[2]
    for r in copies:
        assert r[1] in by_id
        assert '"coerced":"InstitutionName,PatientID"' in r[3]
        assert r[5] == "pacs=done"
