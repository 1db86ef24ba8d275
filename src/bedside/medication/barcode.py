"""What a scanned medication barcode says: the GTIN (with its check digit verified), and from a GS1
element string the expiry, lot and serial; and the US National Drug Code a GTIN carries.

Scanners send a GS1 DataMatrix as raw element strings (AIs run together, variable-length fields
ended by the GS character, often after the symbology identifier `]d2`), or as the human-readable
form with the AIs in brackets; a linear barcode sends the bare GTIN-8/12/13/14. Every refusal says
what a nurse can act on ("check digit 5 does not match 6: rescan or enter the code by hand").

NDC: a US pharmaceutical GTIN-14 is `0` + `03` + the 10-digit NDC + check digit (a UPC-A `3` +
NDC + check, padded). The 10 digits come in three layouts (4-4-2, 5-3-2, 5-4-1), which the digits
alone do not tell apart, so the 11-digit (5-4-2) forms they could be are all returned, for a
lookup to settle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

GS = "\x1d"  # FNC1 as scanners send it inside a GS1 element string
SYMBOLOGY_IDS = ("]d2", "]Q3", "]C1", "]e0")  # GS1 DataMatrix, QR, GS1-128, DataBar
# Application identifiers a medication label uses: AI -> (name, fixed length or None for variable, max)
AIS = {
    "01": ("gtin", 14, 14),
    "10": ("lot", None, 20),
    "11": ("production", 6, 6),
    "17": ("expiry", 6, 6),
    "21": ("serial", None, 20),
    "30": ("count", None, 8),
    "710": ("national_code", None, 20),  # e.g. a German PZN
    "711": ("national_code", None, 20),
    "712": ("national_code", None, 20),
    "713": ("national_code", None, 20),
}
_BRACKETED = re.compile(r"\((\d{2,4})\)([^(]*)")
NDC_HYPHENATED = re.compile(r"^(\d{4,5})-(\d{3,4})-(\d{1,2})$")


class BarcodeError(ValueError):
    """A scan that cannot be read as a medication code; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Scan:
    gtin: str  # 14 digits, check digit verified
    expiry: date | None = None
    lot: str | None = None
    serial: str | None = None
    national_code: str | None = None

    def ndc11_candidates(self) -> tuple[str, ...]:
        """The 11-digit NDCs this GTIN could carry (empty when it is not a US drug GTIN)."""
        return ndc11_from_gtin(self.gtin)


def check_digit(digits: str) -> int:
    """GS1 mod-10 check digit of `digits` (everything before the check digit): weights 3, 1, 3, ...
    from the right."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits)))
    return (10 - total % 10) % 10


def gtin14(code: str) -> str:
    """A GTIN-8/12/13/14 as 14 digits, its check digit verified."""
    code = code.strip()
    if not code.isascii() or not code.isdigit():
        raise BarcodeError("a GTIN is digits only; rescan, or enter the code printed under the barcode")
    if len(code) not in (8, 12, 13, 14):
        raise BarcodeError(f"a GTIN has 8, 12, 13 or 14 digits, this code has {len(code)}; rescan")
    expected = check_digit(code[:-1])
    if int(code[-1]) != expected:
        raise BarcodeError(
            f"check digit {code[-1]} does not match {expected}: a misread or a damaged label; rescan or enter the code"
        )
    return code.zfill(14)


def parse_scan(raw: str) -> Scan:
    """A scanner's output: a bare GTIN, a GS1 element string (raw, GS-separated) or its
    human-readable form with bracketed AIs."""
    text = raw.strip()
    for prefix in SYMBOLOGY_IDS:
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    text = text.lstrip(GS)
    if not text:
        raise BarcodeError("the scan is empty; rescan")
    if text.isascii() and text.isdigit() and len(text) in (8, 12, 13, 14):  # 14: ITF-14, GS1 DataBar
        return Scan(gtin14(text))
    fields = _bracketed(text) if text.startswith("(") else _element_string(text)
    if "gtin" not in fields:
        raise BarcodeError("the scan carries no product code (GS1 AI 01); scan the product's own barcode")
    return Scan(
        gtin=gtin14(fields["gtin"]),
        expiry=_expiry(fields["expiry"]) if "expiry" in fields else None,
        lot=fields.get("lot"),
        serial=fields.get("serial"),
        national_code=fields.get("national_code"),
    )


def _element_string(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    at = 0
    while at < len(text):
        ai = next((a for a in sorted(AIS, key=len, reverse=True) if text.startswith(a, at)), None)
        if ai is None:
            raise BarcodeError(f"unknown GS1 application identifier at position {at + 1}; rescan")
        name, fixed, most = AIS[ai]
        at += len(ai)
        if fixed is not None:
            value, at = text[at : at + fixed], at + fixed
            if len(value) != fixed or not value.isdigit():
                raise BarcodeError(f"GS1 field ({ai}) must be {fixed} digits; rescan")
        else:
            end = text.find(GS, at)
            end = len(text) if end < 0 else end
            value, at = text[at:end], end + 1
            if not value or len(value) > most:
                raise BarcodeError(f"GS1 field ({ai}) must be 1 to {most} characters; rescan")
        fields[name] = value
    return fields


def _bracketed(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    matched = 0
    for found in _BRACKETED.finditer(text):
        ai, value = found.group(1), found.group(2).strip()
        if ai not in AIS:
            raise BarcodeError(f"unknown GS1 application identifier ({ai}); rescan")
        name, fixed, most = AIS[ai]
        if (fixed is not None and (len(value) != fixed or not value.isdigit())) or not 0 < len(value) <= most:
            raise BarcodeError(f"GS1 field ({ai}) is malformed; rescan")
        fields[name] = value
        matched += len(found.group(0))
    if matched != len(text):
        raise BarcodeError("the scan is not a GS1 element string; rescan")
    return fields


def _expiry(yymmdd: str) -> date:
    """GS1 dates: YY within 49 years ahead / 50 behind (here: 20YY), DD 00 is the month's last day."""
    year, month, day = 2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:])
    if not 1 <= month <= 12:
        raise BarcodeError("the expiry date (AI 17) has no such month; check the label")
    if day == 0:
        following = date(year + month // 12, month % 12 + 1, 1)
        return date.fromordinal(following.toordinal() - 1)
    try:
        return date(year, month, day)
    except ValueError:
        raise BarcodeError("the expiry date (AI 17) has no such day; check the label") from None


def ndc11_from_gtin(gtin: str) -> tuple[str, ...]:
    """The 11-digit NDCs a US drug GTIN-14 (`003` + NDC-10 + check) could carry."""
    if len(gtin) != 14 or not gtin.startswith("003"):
        return ()
    return ndc11_candidates(gtin[3:13])


def ndc11_candidates(ndc10: str) -> tuple[str, ...]:
    """An unhyphenated 10-digit NDC in its three possible 5-4-2 forms (4-4-2, 5-3-2, 5-4-1 padded)."""
    if len(ndc10) != 10 or not ndc10.isdigit():
        raise BarcodeError("an NDC without hyphens has 10 digits; enter it as printed, with its hyphens")
    return ("0" + ndc10, ndc10[:5] + "0" + ndc10[5:], ndc10[:9] + "0" + ndc10[9:])


def ndc11(code: str) -> str:
    """A printed NDC (4-4-2, 5-3-2 or 5-4-1 with hyphens, or 11 digits, or 5-4-2) as 11 digits."""
    text = code.strip()
    if text.isascii() and text.isdigit() and len(text) == 11:
        return text
    found = NDC_HYPHENATED.match(text)
    if found is None:
        raise BarcodeError("an NDC is 10 digits in 4-4-2, 5-3-2 or 5-4-1 with hyphens, or 11 digits; check the label")
    labeler, product, package = found.groups()
    if len(labeler) + len(product) + len(package) not in (10, 11):
        raise BarcodeError("an NDC has 10 digits (or 11 in 5-4-2); check the label")
    return labeler.zfill(5) + product.zfill(4) + package.zfill(2)
