"""``medgw models list|check|run`` and ``medgw ai history``, as a technician types them
(``gateway.cli.main`` in-process, with the ``--card`` and ``--config`` forms), on tiny
models built here and pydicom-data's radiographs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ai_models_fixtures import constant_model, echo_mean_model, raising_model, write_card
from PIL import Image
from pydicom.data import get_testdata_file

from ai_models.triage import TriageParams, TriageStep
from dicom.headers import routing_headers
from gateway.cli import main
from gateway.envelope import Envelope
from gateway.registry import PluginContext

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")
URGENT = [0.05, 0.1, 0.9]  # No Finding, Effusion, Pneumothorax


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data)")
    return Path(str(path))


def medgw(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``medgw ARGS``."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Cards: ``cxr`` (urgent on any image), ``raiser`` (fails each run), ``badsha``
    (the card's sha256 is not the file's), ``echo`` (outputs = the image's mean)."""
    folder = tmp_path / "models"
    folder.mkdir()
    return {
        "cxr": write_card(
            folder, constant_model(folder / "cxr.onnx", probabilities=URGENT), id="cxr"
        ),
        "raiser": write_card(folder, raising_model(folder / "raiser.onnx"), id="raiser"),
        "badsha": write_card(
            folder, constant_model(folder / "bad.onnx"), id="badsha", sha256="d" * 64
        ),
        "echo": write_card(
            folder,
            echo_mean_model(folder / "echo.onnx"),
            id="echo",
            output={"activation": "none", "thresholds": None},
        ),
    }


def config(tmp_path: Path, models: dict[str, Path], *, triage: list[str] | None = None) -> Path:
    doc: dict[str, Any] = {
        "site": {"id": "cli-test"},
        "state_dir": str(tmp_path / "state"),
        "models": [{"id": k, "card": str(v)} for k, v in models.items()],
        "destinations": [{"id": "pacs", "type": "folder", "path": str(tmp_path / "pacs")}],
        "routes": [
            {
                "match": {"kind": "dicom"},
                "steps": [{"ai-triage": {"models": triage or ["cxr"]}}],
                "to": ["pacs"],
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def png(path: Path, value: int, size: int = 300) -> Path:
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(path)
    return path


# -- models list / check ---------------------------------------------------------------


def test_models_list(tmp_path: Path, models: dict[str, Path], capsys: Any) -> None:
    code, out, _ = medgw(capsys, "models", "list", "--card", str(models["cxr"]))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["cxr", "cxr", "1.0", str(models["cxr"])]
    assert lines[1].strip() == (
        "applies to: Modality CR/DX, BodyPartExamined CHEST/THORAX, ViewPosition PA/AP, "
        "PhotometricInterpretation MONOCHROME1/MONOCHROME2, at least 256x256 (rows x columns)"
    )
    assert lines[2].strip() == "labels: No Finding, Effusion, Pneumothorax; urgent: Pneumothorax"

    broken = tmp_path / "broken.yaml"
    broken.write_text("id: broken\nversion: '1'\n", encoding="utf-8")
    cfg = config(tmp_path, {**models, "broken": broken})
    code, out, _ = medgw(capsys, "models", "list", "--config", str(cfg))
    assert code == 0
    firsts = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert firsts == ["cxr", "raiser", "badsha", "echo", "broken"]
    assert "broken               CARD ERROR " in out and "required field is missing" in out


def test_models_list_needs_a_valid_config(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "gateway.yaml"
    bad.write_text("site: {id: x}\nroutes: [{match: {kind: dicom}}]\n", encoding="utf-8")
    code, _, err = medgw(capsys, "models", "list", "--config", str(bad))
    assert code == 2
    assert err.startswith(f"{bad}: 1 error(s)")
    empty = tmp_path / "empty.yaml"
    empty.write_text("site: {id: x}\n", encoding="utf-8")
    code, out, _ = medgw(capsys, "models", "list", "--config", str(empty))
    assert (code, out) == (0, "no models configured (models: in the gateway config)\n")


def test_models_check(tmp_path: Path, models: dict[str, Path], capsys: Any) -> None:
    code, out, _ = medgw(capsys, "models", "check", "--card", str(models["cxr"]))
    assert code == 0
    assert out.startswith(
        "cxr: OK cxr 1.0 sha256 verified, provider CPUExecutionProvider, 3 outputs, test run "
    )
    code, out, _ = medgw(capsys, "models", "check", "--config", str(config(tmp_path, models)))
    assert code == 1
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["cxr"].startswith("OK cxr 1.0 sha256 verified")
    assert lines["raiser"].startswith("FAILED model error: ")
    assert lines["badsha"].startswith("FAILED ") and "does not match card badsha 1.0" in out
    assert lines["echo"].startswith("OK echo 1.0")


# -- models run --------------------------------------------------------------------------


def test_models_run_on_a_chest_radiograph(models: dict[str, Path], capsys: Any) -> None:
    code, out, _ = medgw(
        capsys, "models", "run", str(sample("RG1_UNCR.dcm")), "--card", str(models["cxr"])
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("cxr: priority urgent (") and "CPUExecutionProvider" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["Pneumothorax", "Effusion", "No"]
    assert lines[1].split() == ["Pneumothorax", "0.900", "(threshold", "0.3)", "URGENT"]
    assert lines[3].split() == ["No", "Finding", "0.050", "(threshold", "0.5)"]


def test_models_run_refuses_a_tibia_unless_forced(models: dict[str, Path], capsys: Any) -> None:
    rg3 = str(sample("RG3_UNCI.dcm"))
    code, out, _ = medgw(capsys, "models", "run", rg3, "--card", str(models["cxr"]))
    assert code == 0
    assert out == (
        "cxr: not applicable: BodyPartExamined EXTREMITY not in [CHEST, THORAX] "
        "(forwarded unchanged; --force to run)\n"
    )
    code, out, _ = medgw(capsys, "models", "run", rg3, "--card", str(models["cxr"]), "--force")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        "cxr: not applicable: BodyPartExamined EXTREMITY not in [CHEST, THORAX] "
        "(run anyway: --force)"
    )
    assert lines[1].startswith("cxr: priority urgent (")


def test_models_run_on_a_png(tmp_path: Path, models: dict[str, Path], capsys: Any) -> None:
    """A PNG has no header: a chest card refuses it, --force runs it; the model sees the
    PNG's values (x / 255: a mean of 51 gives 0.2)."""
    image = str(png(tmp_path / "cxr.png", 51))
    card = str(models["echo"])
    code, out, _ = medgw(capsys, "models", "run", image, "--card", card)
    assert code == 0
    assert out.startswith("echo: not applicable: Modality OT not in [CR, DX]; BodyPartExamined")
    code, out, _ = medgw(capsys, "models", "run", image, "--card", card, "--force")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("echo: priority normal (")
    assert [line.split()[-2:] for line in lines[2:]] == [["(threshold", "0.5)"]] * 3
    assert {line.split()[-3] for line in lines[2:]} == {"0.200"}


def test_models_run_with_a_config(tmp_path: Path, models: dict[str, Path], capsys: Any) -> None:
    cfg = str(config(tmp_path, models))
    rg1 = str(sample("RG1_UNCR.dcm"))
    code, out, _ = medgw(capsys, "models", "run", rg1, "--config", cfg, "--model", "cxr")
    assert code == 0 and out.startswith("cxr: priority urgent")
    assert "raiser" not in out
    code, _, err = medgw(capsys, "models", "run", rg1, "--config", cfg, "--model", "nope")
    assert (code, err) == (2, "medgw models run: no model 'nope' configured\n")
    code, out, _ = medgw(capsys, "models", "run", rg1, "--config", cfg, "--model", "raiser")
    assert code == 1
    assert out.startswith("raiser: FAILED model error: ")
    assert out.endswith("(the gateway forwards such an image unchanged)\n")
    code, out, _ = medgw(capsys, "models", "run", rg1, "--config", cfg, "--model", "badsha")
    assert code == 1 and out.startswith("badsha: model unavailable: ")


def test_models_run_on_a_missing_image(
    tmp_path: Path, models: dict[str, Path], capsys: Any
) -> None:
    for name in ("absent.dcm", "absent.png"):
        missing = str(tmp_path / name)
        code, out, err = medgw(capsys, "models", "run", missing, "--card", str(models["cxr"]))
        assert (code, out) == (2, "")
        assert err.startswith(f"medgw models run: cannot read {missing}: ")


# -- ai history --------------------------------------------------------------------------


async def test_ai_history_after_a_triage(
    tmp_path: Path, models: dict[str, Path], capsys: Any
) -> None:
    cfg = str(config(tmp_path, models))
    assert medgw(capsys, "ai", "history", "--config", cfg) == (0, "no AI history yet\n", "")

    # what the gateway's ai-triage step does with its state folder
    params = TriageParams.model_validate(
        {"models": ["cxr"], "budget_s": 10}, context={"models": {"cxr": models["cxr"]}}
    )
    step = TriageStep(params, PluginContext("cli-test", str(tmp_path / "state"), None))
    sent = {}
    for name in ("RG1_UNCR.dcm", "RG3_UNCI.dcm"):
        body = sample(name).read_bytes()
        headers = routing_headers(body)
        sent[name] = headers
        await step.run(Envelope(kind="dicom", source="modalities", body=body, headers=headers))
    step.models[0].close()

    code, out, _ = medgw(capsys, "ai", "history", "--config", cfg)
    assert code == 0
    rg3_line, rg1_line = out.splitlines()  # newest first
    rg1, rg3 = sent["RG1_UNCR.dcm"], sent["RG3_UNCI.dcm"]
    assert rg1_line.split()[2:5] == ["cxr", "1.0", "done"]
    assert f" urgent study={rg1['StudyInstanceUID']} sop={rg1['SOPInstanceUID']} " in rg1_line
    assert rg1_line.endswith(" sent=sr,hl7,event")
    assert rg3_line.split()[2:5] == ["cxr", "1.0", "skipped"]
    assert " BodyPartExamined EXTREMITY not in [CHEST, THORAX] " in rg3_line
    assert rg3_line.endswith(" - sent=-")

    code, out, _ = medgw(capsys, "ai", "history", "--config", cfg, "--json", "--limit", "1")
    (row,) = json.loads(out)
    assert (row["sop_uid"], row["status"]) == (rg3["SOPInstanceUID"], "skipped")
    code, out, _ = medgw(
        capsys, "ai", "history", "--config", cfg, "--json", "--study", rg1["StudyInstanceUID"]
    )
    (row,) = json.loads(out)
    assert (row["priority"], row["outputs"]["Pneumothorax"]) == ("urgent", 0.9)
    assert set(row["sent"]) == {"sr", "hl7", "event"}
