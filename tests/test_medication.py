"""The medication check end to end through the dataplane (the demo repository's medication_check
graph, the real drug dictionary and ANSM thesaurus): each clinical case with its verdict and reason,
and over REST and gRPC once."""

from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta
from typing import Any

import numpy as np
import pytest

from bedside.dataplane.dataplane import Dataplane
from bedside.errors import InvalidInput
from bedside.medication.barcode import GS, check_digit
from bedside.models.demo_medication import FORMULARY, demo_gtin
from bedside.protocol.types import CallContext, InferRequest

GTIN = {label: demo_gtin(i) for i, (label, *_) in enumerate(FORMULARY, 1)}
DUE = "2026-11-25T08:00:00"


def order(drug: str, dose: float, route: str = "oral", **more: Any) -> dict[str, Any]:
    return {"drug": drug, "dose_mg": dose, "route": route, "due": DUE, **more}


def context(*orders: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"patient_id": "W-1", "age": 52, "sex": "M", "weight_kg": 80, "egfr": 85, "allergies": [],
            "medications": [], "orders": list(orders), "scanned_at": "2026-11-25T08:10:00", **more}  # fmt: skip


@pytest.fixture(scope="module")
def dataplane(demo_repo):
    dp = Dataplane(demo_repo)
    dp.start()
    yield dp
    dp.close()


def check(dp: Dataplane, barcode: str, patient: dict[str, Any]) -> tuple[str, list[str], list[dict[str, Any]], dict]:
    request = InferRequest(
        {"barcode": np.array([barcode], dtype=object), "patient": np.array([json.dumps(patient)], dtype=object)}
    )
    response = asyncio.run(dp.infer("medication_check", None, request, CallContext()))
    findings = json.loads(response.outputs["findings"][0])
    return str(response.outputs["verdict"][0]), list(response.outputs["reasons"]), findings, response.parameters or {}


def codes(findings: list[dict[str, Any]]) -> set[str]:
    return {f["code"] for f in findings}


def test_the_right_drug_for_the_right_patient_passes(dataplane):
    verdict, reasons, _, params = check(dataplane, GTIN["Coumadin"], context(order("warfarin", 5)))
    assert verdict == "PASS" and reasons[0].startswith("Right patient, drug, dose, route and time")
    assert params["provenance"] == "synthetic" and params["degraded"] is False  # the risk model says what it is
    assert {"step_product_us", "step_risk_us", "step_verdict_us"} <= set(params)


def test_a_brand_order_matches_the_generic_and_quantity_makes_the_dose(dataplane):
    patient = context(order("Coumadin", 5), quantity=5)
    verdict, _, findings, _ = check(dataplane, GTIN["warfarin"], patient)  # 5 x 1 mg warfarin
    assert verdict == "PASS", findings


@pytest.mark.parametrize(
    ("barcode", "patient", "verdict", "code", "words"),
    [
        (GTIN["Coumadin"], context(order("warfarin", 5, patient_id="W-2")), "STOP", "WRONG_PATIENT", "another patient"),
        (GTIN["Coumadin"], context(order("metformin", 500)), "STOP", "NO_ORDER", "No active order for warfarin"),
        (GTIN["warfarin"], context(order("warfarin", 5)), "STOP", "WRONG_DOSE", "gives 1 mg"),
        (GTIN["cefazolin"], context(order("cefazolin", 1000, "im")), "STOP", "WRONG_ROUTE", "intravenous use"),
        (GTIN["Coumadin"], context(order("warfarin", 5), scanned_at="2026-11-25T10:15:00"), "WARN", "OUTSIDE_WINDOW",
         "2 h 15 min late"),
        (GTIN["amoxicillin"], context(order("amoxicillin", 500), allergies=["penicillin"]), "STOP", "ALLERGY_CLASS",
         "amoxicillin is a penicillin"),
        (GTIN["Tylenol"], context(order("acetaminophen", 500), allergies=["Tylenol"]), "STOP", "ALLERGY",
         "allergic to Tylenol"),
        (GTIN["cefazolin"], context(order("cefazolin", 1000, "iv"), allergies=["penicillin"]), "WARN",
         "CROSS_SENSITIVITY", "cefazolin (a cephalosporin)"),
        (GTIN["cefazolin"], context(order("cefazolin", 1000, "iv"), allergies=["amoxicillin"]), "WARN",
         "CROSS_SENSITIVITY", "amoxicillin allergy (penicillin)"),
        (GTIN["Coumadin"], context(order("warfarin", 5), medications=["miconazole"]), "STOP", "INTERACTION",
         "warfarin + miconazole: contraindicated"),
        (GTIN["Zocor"], context(order("simvastatin", 40), medications=["Biaxin"]), "STOP", "INTERACTION",
         "simvastatin + clarithromycin: contraindicated"),
        (GTIN["Coumadin"], context(order("warfarin", 5), medications=["acetaminophen"]), "WARN", "INTERACTION",
         "precaution for use"),
        (GTIN["Neurontin"], context(order("gabapentin", 600), quantity=2, age=84, sex="F", weight_kg=50,
         creatinine_mg_dl=2.6, egfr=None), "WARN", "RENAL_DOSE", "CrCl (Cockcroft-Gault) 13 mL/min"),
        (GTIN["metformin"], context(order("metformin", 500), egfr=22), "STOP", "RENAL_AVOID",
         "contraindicated below eGFR 30"),
        (GTIN["Neurontin"], context(order("gabapentin", 300), egfr=None), "WARN", "RENAL_UNKNOWN", "no recent eGFR"),
        ("]d2" + "01" + GTIN["Coumadin"][:-1] + str((int(GTIN["Coumadin"][-1]) + 1) % 10) + "17301231",
         context(order("warfarin", 5)), "STOP", "BARCODE", "check digit"),
        ("@@##!!", context(order("warfarin", 5)), "STOP", "BARCODE", "Barcode not read"),
        ("01234565", context(order("warfarin", 5)), "STOP", "UNKNOWN_PRODUCT", "not in the hospital formulary"),
    ],
)  # fmt: skip
def test_each_clinical_case_gets_its_verdict_and_reason(dataplane, barcode, patient, verdict, code, words):
    patient = {k: v for k, v in patient.items() if v is not None}
    got, reasons, findings, _ = check(dataplane, barcode, patient)
    assert got == verdict and code in codes(findings), (got, findings)
    assert any(words in r for r in reasons), reasons


def test_an_expired_product_and_a_typed_ndc(dataplane):
    past = (date.today() - timedelta(days=40)).strftime("%y%m%d")
    expired = f"]d2\x1d01{GTIN['Coumadin']}17{past}10LOT1{GS}"
    verdict, reasons, findings, _ = check(dataplane, expired, context(order("warfarin", 5)))
    assert verdict == "STOP" and "EXPIRED" in codes(findings) and "Expired product" in reasons[0]
    verdict, _, findings, _ = check(dataplane, "99999-0001-1", context(order("warfarin", 5)))  # NDC 5-4-1, as printed
    assert verdict == "PASS", findings


def test_a_malformed_patient_context_is_a_400_naming_the_field(dataplane):
    with pytest.raises(InvalidInput, match=r"orders\[0\].dose_mg must be between 0 and"):
        check(dataplane, GTIN["Coumadin"], context(order("warfarin", -5)))
    with pytest.raises(InvalidInput, match="route 'nasal spray' is not one of"):
        check(dataplane, GTIN["Coumadin"], context(order("warfarin", 5, "nasal spray")))
    with pytest.raises(InvalidInput, match="must be one JSON object"):
        request = InferRequest({"barcode": np.array(["x"], dtype=object), "patient": np.array(["{"], dtype=object)})
        asyncio.run(dataplane.infer("medication_check", None, request, CallContext()))


def test_without_the_risk_model_the_rules_still_answer_and_say_so(demo_repo):
    dp = Dataplane(demo_repo)
    dp.start()
    try:
        asyncio.run(dp.unload("medication_risk", CallContext().caller))
        verdict, _, findings, params = check(dp, GTIN["Coumadin"], context(order("warfarin", 5)))
        assert verdict == "PASS" and params["degraded"] is True and "risk:" in params["degraded_steps"]
        assert "RISK_UNAVAILABLE" in codes(findings) and "provenance" not in params
    finally:
        dp.close()


def test_demo_gtins_carry_valid_check_digits():
    for gtin in GTIN.values():
        assert check_digit(gtin[:-1]) == int(gtin[-1]) and gtin.startswith("00399999")


def test_the_check_over_rest_and_grpc_gives_the_same_verdict(demo_repo, tmp_path):
    import grpc

    from bedside.server.grpc import oip_pb2
    from tests.conftest import free_port, start_server

    patient = json.dumps(context(order("warfarin", 5), medications=["miconazole"]))
    grpc_port = free_port()
    server = start_server(demo_repo, tmp_path / "log", "--grpc-port", str(grpc_port))
    try:
        client = server.client()
        body = {"inputs": [{"name": "barcode", "datatype": "BYTES", "shape": [1], "data": [GTIN["Coumadin"]]},
                           {"name": "patient", "datatype": "BYTES", "shape": [1], "data": [patient]}]}  # fmt: skip
        answer = client.request("POST", "/v2/models/medication_check/infer", body)
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        assert outputs["verdict"] == ["STOP"] and "miconazole" in outputs["reasons"][0]
        assert answer["parameters"]["provenance"] == "synthetic" and "step_risk_us" in answer["parameters"]
        assert client.request("GET", "/v2/models/medication_check")["platform"] == "bedside_graph"
        client.close()
        request = oip_pb2.ModelInferRequest(model_name="medication_check")
        for name, value in (("barcode", GTIN["Coumadin"]), ("patient", patient)):
            request.inputs.add(name=name, datatype="BYTES", shape=[1]).contents.bytes_contents.append(value.encode())
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=oip_pb2.ModelInferResponse.FromString,
            )
            reply = infer(request, timeout=30)
        by_name = {o.name: i for i, o in enumerate(reply.outputs)}
        verdict = reply.outputs[by_name["verdict"]]
        data = (
            verdict.contents.bytes_contents[0]
            if verdict.contents.bytes_contents
            else reply.raw_output_contents[by_name["verdict"]][4:]
        )
        assert data == b"STOP"
    finally:
        server.process.terminate()
        server.process.wait(10)
