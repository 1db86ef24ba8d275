"""The patient context a medication check is asked with, read and checked once: a malformed context
is the caller's integration error (a 400 naming the field), never a verdict.

    {"patient_id": "wristband id", "age": 78, "sex": "F", "weight_kg": 61, "egfr": 28,
     "creatinine_mg_dl": 1.9, "allergies": ["penicillin"], "medications": ["amiodarone"],
     "orders": [{"patient_id": "...", "drug": "warfarin", "dose_mg": 5, "route": "oral",
                 "due": "2026-11-25T08:00:00", "window_min": 60}],
     "quantity": 1, "scanned_at": "2026-11-25T08:10:00"}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from bedside.errors import InvalidInput
from bedside.settings import DEFAULTS

ROUTES = {
    "oral": "oral", "po": "oral", "by mouth": "oral", "enteral": "oral",
    "iv": "intravenous", "intravenous": "intravenous",
    "sc": "subcutaneous", "sq": "subcutaneous", "subcut": "subcutaneous", "subcutaneous": "subcutaneous",
    "im": "intramuscular", "intramuscular": "intramuscular",
    "sl": "sublingual", "sublingual": "sublingual",
    "buccal": "buccal", "pr": "rectal", "rectal": "rectal", "topical": "topical",
    "inhaled": "inhaled", "inh": "inhaled",
}  # fmt: skip
DEFAULT_WINDOW_MIN = 60.0  # the usual "one hour either side" of a scheduled dose (ISMP 2011 guidelines)
_MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class Order:
    patient_id: str
    drug: str
    dose_mg: float
    route: str
    due: datetime | None
    window: timedelta


@dataclass(frozen=True, slots=True)
class Patient:
    patient_id: str
    age: float | None
    female: bool | None
    weight_kg: float | None
    egfr: float | None
    creatinine_mg_dl: float | None
    allergies: tuple[str, ...]
    medications: tuple[str, ...]
    orders: tuple[Order, ...]
    quantity: float
    scanned_at: datetime


def route(text: str, where: str) -> str:
    found = ROUTES.get(" ".join(text.lower().split()))
    if found is None:
        raise InvalidInput(f"{where}: route {text[:32]!r} is not one of {', '.join(sorted(set(ROUTES.values())))}")
    return found


def parse_patient(raw: Any, now: datetime) -> Patient:
    try:
        doc = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        raise InvalidInput("input 'patient' must be one JSON object (the patient context)") from None
    if not isinstance(doc, dict):
        raise InvalidInput("input 'patient' must be a JSON object")
    limit = DEFAULTS.limits.medication_max_items
    patient_id = _text(doc, "patient_id", "patient")
    orders = tuple(_order(o, i, patient_id) for i, o in enumerate(_list(doc, "orders", limit, dict)))
    sex = doc.get("sex")
    if sex is not None and (not isinstance(sex, str) or sex.upper() not in ("F", "M")):
        raise InvalidInput("patient.sex must be 'F' or 'M' (or left out)")
    return Patient(
        patient_id=patient_id,
        age=_number(doc, "age", 0, 130),
        female=None if sex is None else sex.upper() == "F",
        weight_kg=_number(doc, "weight_kg", 0.2, 500),
        egfr=_number(doc, "egfr", 0, 250),
        creatinine_mg_dl=_number(doc, "creatinine_mg_dl", 0.05, 30),
        allergies=tuple(_list(doc, "allergies", limit, str)),
        medications=tuple(_list(doc, "medications", limit, str)),
        orders=orders,
        quantity=_number(doc, "quantity", 0.01, 1000) or 1.0,
        scanned_at=_time(doc.get("scanned_at"), "patient.scanned_at") or now,
    )


def _order(doc: dict[str, Any], i: int, patient_id: str) -> Order:
    where = f"patient.orders[{i}]"
    dose = _number(doc, "dose_mg", 0, 1e6, where)
    if dose is None or dose <= 0:
        raise InvalidInput(f"{where}.dose_mg must be a positive number of mg")
    window = _number(doc, "window_min", 0, 24 * 60, where)
    return Order(
        patient_id=str(doc.get("patient_id") or patient_id)[:_MAX_TEXT],
        drug=_text(doc, "drug", where),
        dose_mg=dose,
        route=route(_text(doc, "route", where), where),
        due=_time(doc.get("due"), f"{where}.due"),
        window=timedelta(minutes=DEFAULT_WINDOW_MIN if window is None else window),
    )


def _text(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_TEXT:
        raise InvalidInput(f"{where}.{key} must be text of 1-{_MAX_TEXT} characters")
    return value.strip()


def _number(doc: dict[str, Any], key: str, low: float, high: float, where: str = "patient") -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidInput(f"{where}.{key} must be a number")
    if not low <= value <= high:
        raise InvalidInput(f"{where}.{key} must be between {low:g} and {high:g}")
    return float(value)


def _list(doc: dict[str, Any], key: str, limit: int, kind: type) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise InvalidInput(f"patient.{key} must be a list of {'objects' if kind is dict else 'names'}")
    if len(value) > limit:
        raise InvalidInput(f"patient.{key} has {len(value)} entries; at most {limit} (limits.medication_max_items)")
    if kind is str and any(len(v) > _MAX_TEXT for v in value):
        raise InvalidInput(f"patient.{key}: each name must be at most {_MAX_TEXT} characters")
    return value


def _time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be an ISO 8601 date and time, e.g. 2026-11-25T08:00:00")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{where} must be an ISO 8601 date and time, e.g. 2026-11-25T08:00:00") from None
    return moment.replace(tzinfo=None) if moment.tzinfo is None else moment.astimezone().replace(tzinfo=None)
