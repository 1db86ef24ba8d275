"""The medication check's graph steps, registered for graph.toml files to name (`medication.*`).

Between steps the product and the findings travel as one JSON text each (a BYTES tensor), so every
intermediate result can be read in a test or a trace. The reference data (drug names, the ANSM
thesaurus, the graph folder's formulary) is read once, when a graph using a step loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bedside.errors import ModelLoadError
from bedside.graphs.steps import Port, StepContext, StepFunction, StepType, register
from bedside.medication.barcode import NDC_HYPHENATED, BarcodeError, ndc11, ndc11_from_gtin, parse_scan
from bedside.medication.checks import (
    Finding,
    Product,
    check_allergies,
    check_interactions,
    check_order,
    check_renal,
    kidney_function,
    verdict,
)
from bedside.medication.patient import parse_patient, route
from bedside.medication.reference import drug_names, thesaurus
from bedside.medication.tables import HIGH_ALERT, RENAL

TEXT = Port("text", "BYTES", (-1,))
PRODUCT = Port("product", "BYTES", (1,))
PATIENT = Port("patient", "BYTES", (-1,))
FINDINGS = Port("findings", "BYTES", (1,))
FEATURES = ("age", "weight", "kidney", "medications", "interaction", "renal", "high_alert", "allergy")
FEATURE_PORT = Port("features", "FP32", (-1, len(FEATURES)))
MAX_FORMULARY_BYTES = 16 * 1024 * 1024


def _one(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    return flat[0] if flat.size else ""


def _json(value: Any) -> np.ndarray:
    return np.array([orjson.dumps(value).decode()], dtype=object)


def _product(array: np.ndarray) -> tuple[Product | None, dict[str, Any]]:
    doc = orjson.loads(_one(array))
    if "error" in doc:
        return None, doc
    product = Product(doc["name"], tuple(doc["generics"]), doc["strength_mg"], doc["route"], doc["form"])
    return product, doc


# --- barcode -> product ------------------------------------------------------------------------


def _build_product(parameters: Mapping[str, Any], folder: Path) -> StepFunction:
    names = drug_names()
    by_gtin, by_ndc = _formulary(folder / str(parameters.get("formulary", "formulary.json")), names)

    def product(inputs: dict[str, np.ndarray], ctx: StepContext) -> dict[str, np.ndarray]:
        raw = str(_one(inputs["barcode"])).strip()
        try:
            if NDC_HYPHENATED.match(raw) or (raw.isdigit() and len(raw) == 11):
                entry, expiry = by_ndc.get(ndc11(raw)), None
            else:
                scan = parse_scan(raw)
                entry, expiry = by_gtin.get(scan.gtin), scan.expiry
                for candidate in scan.ndc11_candidates() if entry is None else ():
                    entry = entry or by_ndc.get(candidate)
        except BarcodeError as exc:
            return {"product": _json({"error": f"Barcode not read: {exc}", "code": "BARCODE"})}
        if entry is None:
            return {
                "product": _json(
                    {
                        "error": "This product is not in the hospital formulary. Do not give: "
                        "check the product with pharmacy.",
                        "code": "UNKNOWN_PRODUCT",
                    }
                )
            }
        if expiry is not None and expiry < date.today():
            return {
                "product": _json(
                    {
                        "error": f"Expired product (expiry {expiry:%Y-%m-%d}). Do not give: take a new one from stock.",
                        "code": "EXPIRED",
                    }
                )
            }
        return {"product": _json(entry)}

    return product


def _formulary(path: Path, names: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The hospital's products by GTIN and by 11-digit NDC; each resolved to its generics once."""
    try:
        if path.stat().st_size > MAX_FORMULARY_BYTES:
            raise ModelLoadError(f"formulary {path.name} is larger than {MAX_FORMULARY_BYTES >> 20} MiB")
        rows = orjson.loads(path.read_bytes())
    except OSError:
        raise ModelLoadError(f"the formulary {path.name} cannot be read from the graph folder") from None
    except orjson.JSONDecodeError as exc:
        raise ModelLoadError(f"the formulary {path.name} is not JSON: {exc}") from None
    by_gtin: dict[str, dict[str, Any]] = {}
    by_ndc: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        where = f"formulary entry {i}"
        label = row.get("label_name") or row.get("name")
        generics = tuple(row.get("generics") or names.generics(str(label)))
        if not generics:
            raise ModelLoadError(f"{where}: {str(label)[:64]!r} is not a drug name the dictionary knows; add generics")
        try:
            entry = {
                "name": str(row["name"]),
                "generics": list(generics),
                "brand": bool(names.is_brand(str(label))),
                "strength_mg": float(row["strength_mg"]),
                "route": route(str(row["route"]), where),
                "form": str(row.get("form", "unit")),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where} needs name, strength_mg and route ({type(exc).__name__})") from None
        except Exception as exc:  # an InvalidInput from route(): the formulary's fault here
            raise ModelLoadError(f"{where}: {exc}") from None
        if "gtin" in row:
            gtin = parse_scan(str(row["gtin"])).gtin
            by_gtin[gtin] = entry
            for ndc in ndc11_from_gtin(gtin):
                by_ndc.setdefault(ndc, entry)
        if "ndc" in row:
            by_ndc[ndc11(str(row["ndc"]))] = entry
    if not by_gtin and not by_ndc:
        raise ModelLoadError(f"the formulary {path.name} lists no product with a gtin or ndc")
    return by_gtin, by_ndc


# --- the checks --------------------------------------------------------------------------------


def _now(ctx: StepContext) -> datetime:
    del ctx
    return datetime.now()


def _check_step(name: str, run: Any) -> None:
    def build(parameters: Mapping[str, Any], folder: Path) -> StepFunction:
        names, ansm = drug_names(), thesaurus()

        def check(inputs: dict[str, np.ndarray], ctx: StepContext) -> dict[str, np.ndarray]:
            patient = parse_patient(_one(inputs["patient"]), _now(ctx))  # a bad context: a 400 naming the field
            product, _ = _product(inputs["product"])
            found: list[Finding] = [] if product is None else run(product, patient, names, ansm)
            return {"findings": _json([f.to_dict() for f in found])}

        return check

    register(StepType(f"medication.{name}", (PRODUCT, PATIENT), (FINDINGS,), build, run.__doc__ or ""))


_check_step("order", lambda product, patient, names, ansm: check_order(product, patient, names))
_check_step("allergy", check_allergies)
_check_step("interactions", check_interactions)
_check_step("renal", lambda product, patient, names, ansm: check_renal(product, patient))


def _build_features(parameters: Mapping[str, Any], folder: Path) -> StepFunction:
    def features(inputs: dict[str, np.ndarray], ctx: StepContext) -> dict[str, np.ndarray]:
        patient = parse_patient(_one(inputs["patient"]), _now(ctx))
        product, _ = _product(inputs["product"])
        interactions = orjson.loads(_one(inputs["interactions"]))
        severity = {"STOP": 3, "WARN": 2, "INFO": 1}
        kidney = kidney_function(patient)
        row = [
            (patient.age if patient.age is not None else 60.0) / 100,
            (patient.weight_kg if patient.weight_kg is not None else 70.0) / 100,
            (kidney[0] if kidney is not None else 90.0) / 100,
            min(len(patient.medications) + len(patient.orders), 20) / 10,
            max((severity[f["level"]] for f in interactions), default=0) / 3,
            float(product is not None and any(g in RENAL for g in product.generics)),
            float(product is not None and any(g in HIGH_ALERT for g in product.generics)),
            float(bool(patient.allergies)),
        ]
        return {"features": np.asarray([row], dtype=np.float32)}

    return features


register(
    StepType(
        "medication.features",
        (PRODUCT, PATIENT, Port("interactions", "BYTES", (1,))),
        (FEATURE_PORT,),
        _build_features,
        "the risk model's input: age, weight, kidney function, drug count, worst interaction, flags",
    )
)


def _build_verdict(parameters: Mapping[str, Any], folder: Path) -> StepFunction:
    threshold = float(parameters.get("risk_threshold", 0.5))
    label = str(parameters.get("risk_label", "a demonstration model trained on synthetic data, not validated"))

    def decide(inputs: dict[str, np.ndarray], ctx: StepContext) -> dict[str, np.ndarray]:
        product, doc = _product(inputs["product"])
        findings: list[Finding] = []
        if product is None:
            findings.append(Finding("STOP", str(doc.get("code", "PRODUCT")), str(doc["error"])))
        for key in ("order", "allergy", "interactions", "renal"):
            findings += [Finding(**f) for f in orjson.loads(_one(inputs[key]))]
        risk_input = inputs.get("risk")
        risk = None if risk_input is None else float(risk_input.reshape(-1)[-1])
        if risk_input is None and product is not None:
            missing = "The risk model did not answer; the rules above were applied."
            findings.append(Finding("INFO", "RISK_UNAVAILABLE", missing))
        outcome, reasons = verdict(findings, risk, threshold, label)
        return {
            "verdict": np.array([outcome], dtype=object),
            "reasons": np.array(reasons, dtype=object),
            "findings": _json([f.to_dict() for f in findings]),
        }

    return decide


register(StepType("medication.product", (Port("barcode", "BYTES", (-1,)),), (PRODUCT,), _build_product))
register(
    StepType(
        "medication.verdict",
        (
            PRODUCT,
            *(Port(k, "BYTES", (1,)) for k in ("order", "allergy", "interactions", "renal")),
            Port("risk", "FP32", (-1, 2), optional=True),
        ),
        (Port("verdict", "BYTES", (1,)), Port("reasons", "BYTES", (-1,)), FINDINGS),
        _build_verdict,
    )
)
