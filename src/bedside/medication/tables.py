"""The small clinical tables the medication check applies, each row with its public source.

Renal dosing: common renally cleared drugs, by kidney-function band (mL/min). Product labels state
creatinine clearance (Cockcroft-Gault); the check uses it when the patient's age, weight, sex and
serum creatinine are given, and the lab's eGFR otherwise, and says which it used.

Allergy classes: a drug belongs to a class by its WHO INN stem (the naming rules that give every
penicillin "-cillin" and every cephalosporin "cef-") or by its class in the ANSM thesaurus index.
Cross-sensitivity: the class pairs the drug allergy practice parameter names.

This is a demonstration table: a hospital replaces it with its pharmacy's own, and nothing here is a
substitute for the product label.
"""

from __future__ import annotations

from dataclasses import dataclass

LABEL = "US prescribing information (DailyMed)"
BEERS = "American Geriatrics Society 2023 Beers Criteria, J Am Geriatr Soc 2023;71:2052-81, table 6"
FDA_METFORMIN = "FDA Drug Safety Communication on metformin and kidney function, 8 April 2016"
ALLERGY_PARAMETER = (
    "Khan DA et al. Drug allergy: a 2022 practice parameter update. J Allergy Clin Immunol 2022;150:1333-93"
)
INN_STEMS = "WHO, The use of stems in the selection of International Nonproprietary Names (INN), 2018"


@dataclass(frozen=True, slots=True)
class RenalBand:
    low: float  # mL/min, inclusive
    high: float  # mL/min, exclusive
    avoid: bool  # do not give in this band
    max_single_mg: float | None  # the largest single dose the label allows here (None: see advice)
    advice: str


@dataclass(frozen=True, slots=True)
class RenalRule:
    drug: str  # English generic, lower case
    bands: tuple[RenalBand, ...]
    source: str


RENAL = {
    rule.drug: rule
    for rule in (
        RenalRule(
            "metformin",
            (
                RenalBand(0, 30, True, None, "contraindicated below eGFR 30"),
                RenalBand(30, 45, False, None, "do not start below eGFR 45; review the benefit if already taking it"),
            ),
            FDA_METFORMIN,
        ),
        RenalRule("nitrofurantoin", (RenalBand(0, 30, True, None, "avoid below CrCl 30"),), BEERS),
        RenalRule("spironolactone", (RenalBand(0, 30, True, None, "avoid below CrCl 30 (hyperkalaemia)"),), BEERS),
        RenalRule("ibuprofen", (RenalBand(0, 30, True, None, "avoid NSAIDs below CrCl 30"),), BEERS),
        RenalRule("naproxen", (RenalBand(0, 30, True, None, "avoid NSAIDs below CrCl 30"),), BEERS),
        RenalRule(
            "enoxaparin",
            (RenalBand(0, 30, False, 30.0, "below CrCl 30: 30 mg once daily (prophylaxis), 1 mg/kg once daily"),),
            f"Lovenox (enoxaparin) {LABEL}, section 2.3",
        ),
        RenalRule(
            "gabapentin",
            (
                RenalBand(0, 15, False, 300.0, "below CrCl 15: 100-300 mg a day"),
                RenalBand(15, 30, False, 700.0, "CrCl 15-29: 200-700 mg a day"),
                RenalBand(30, 60, False, 700.0, "CrCl 30-59: 400-1400 mg a day in two doses"),
            ),
            f"Neurontin (gabapentin) {LABEL}, table 2",
        ),
        RenalRule(
            "dabigatran",
            (
                RenalBand(0, 15, True, None, "avoid below CrCl 15"),
                RenalBand(15, 30, False, 75.0, "CrCl 15-30: 75 mg twice daily"),
            ),
            f"Pradaxa (dabigatran) {LABEL}, section 2",
        ),
        RenalRule(
            "rivaroxaban",
            (
                RenalBand(0, 15, True, None, "avoid below CrCl 15"),
                RenalBand(15, 50, False, 15.0, "CrCl 15-50 (atrial fibrillation): 15 mg once daily"),
            ),
            f"Xarelto (rivaroxaban) {LABEL}, section 2",
        ),
        RenalRule(
            "ciprofloxacin",
            (RenalBand(0, 50, False, 500.0, "CrCl below 50: 250-500 mg every 12-18 h"),),
            f"Cipro (ciprofloxacin) {LABEL}, section 2",
        ),
        RenalRule(
            "levetiracetam",
            (
                RenalBand(0, 30, False, 500.0, "CrCl below 30: 250-500 mg every 12 h"),
                RenalBand(30, 50, False, 750.0, "CrCl 30-50: 250-750 mg every 12 h"),
                RenalBand(50, 80, False, 1000.0, "CrCl 50-80: 500-1000 mg every 12 h"),
            ),
            f"Keppra (levetiracetam) {LABEL}, table 1",
        ),
        RenalRule(
            "tramadol",
            (RenalBand(0, 30, False, 100.0, "CrCl below 30: every 12 h, at most 200 mg a day"),),
            f"Ultram (tramadol) {LABEL}, section 2; {BEERS}",
        ),
        RenalRule(
            "digoxin",
            (RenalBand(0, 30, False, 0.125, "CrCl below 30: avoid more than 0.125 mg a day"),),
            BEERS,
        ),
    )
}

# class -> (INN stems: prefix "x-", suffix "-x"; ANSM index classes, folded)
ALLERGY_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "penicillin": (("-cillin",), ("penicillines",)),
    "cephalosporin": (("cef-", "ceph-"), ()),
    "carbapenem": (("-penem",), ()),
    "sulfonamide antibiotic": (("sulfa-",), ()),
    "fluoroquinolone": (("-floxacin",), ("fluoroquinolones",)),
    "macrolide": (("-thromycin",), ("macrolides (sauf spiramycine)",)),
    "nsaid": (("-profen", "-fenac", "-coxib"), ("anti-inflammatoires non steroidiens",)),
    "opioid": ((), ("analgesiques morphiniques agonistes",)),
    "statin": (("-vastatin",), ("inhibiteurs de l'hmg-coa reductase (statines)",)),
}
# what an allergy record may say -> the class it means
ALLERGY_WORDS = {
    "penicillin": "penicillin",
    "penicillins": "penicillin",
    "cephalosporin": "cephalosporin",
    "cephalosporins": "cephalosporin",
    "carbapenem": "carbapenem",
    "carbapenems": "carbapenem",
    "sulfa": "sulfonamide antibiotic",
    "sulfonamide": "sulfonamide antibiotic",
    "sulfonamides": "sulfonamide antibiotic",
    "fluoroquinolone": "fluoroquinolone",
    "fluoroquinolones": "fluoroquinolone",
    "quinolones": "fluoroquinolone",
    "macrolide": "macrolide",
    "macrolides": "macrolide",
    "nsaid": "nsaid",
    "nsaids": "nsaid",
    "opioid": "opioid",
    "opioids": "opioid",
    "opiates": "opioid",
    "statin": "statin",
    "statins": "statin",
}
# (allergy class, product class) -> what to tell the nurse; the practice parameter's figures
CROSS_SENSITIVITY = {
    ("penicillin", "cephalosporin"): "cross-reactivity is about 1-2 %, mostly through similar side chains",
    ("cephalosporin", "penicillin"): "cross-reactivity is about 1-2 %, mostly through similar side chains",
    ("penicillin", "carbapenem"): "cross-reactivity is under 1 %",
    ("cephalosporin", "carbapenem"): "cross-reactivity is under 1 %",
}
# Single-ingredient members of a class that no stem names (aspirin is an NSAID; ANSM files it apart)
CLASS_MEMBERS = {"aspirin": ("nsaid",), "ketorolac": ("nsaid",), "indomethacin": ("nsaid",)}
HIGH_ALERT = frozenset(  # ISMP list of high-alert medications in acute care settings (2018), a subset
    {"warfarin", "heparin", "enoxaparin", "insulin", "dabigatran", "rivaroxaban", "apixaban", "digoxin",
     "morphine", "hydromorphone", "fentanyl", "oxycodone", "methotrexate", "potassium chloride", "amiodarone"}
)  # fmt: skip


def stem_classes(generic: str) -> set[str]:
    found = set(CLASS_MEMBERS.get(generic, ()))
    for name, (stems, _) in ALLERGY_CLASSES.items():
        for stem in stems:
            if (stem.endswith("-") and generic.startswith(stem[:-1])) or (
                stem.startswith("-") and generic.endswith(stem[1:])
            ):
                found.add(name)
    return found


def cockcroft_gault(age: float, weight_kg: float, creatinine_mg_dl: float, female: bool) -> float:
    """Creatinine clearance, mL/min (Cockcroft & Gault, Nephron 1976;16:31-41)."""
    clearance = (140 - age) * weight_kg / (72 * creatinine_mg_dl)
    return clearance * 0.85 if female else clearance
