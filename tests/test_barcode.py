"""Scanned medication codes: GTIN check digits, GS1 element strings raw and bracketed, NDC forms."""

from __future__ import annotations

from datetime import date

import pytest

from bedside.medication.barcode import GS, BarcodeError, check_digit, gtin14, ndc11, ndc11_candidates, parse_scan

KNOWN = [
    ("00312345678906", 6),  # US drug GTIN-14 for NDC 12345-678-90 with its check digit
    ("4006381333931", 1),  # a published EAN-13 (a Stabilo pen, the usual textbook case)
    ("036000291452", 2),  # the UPC-A textbook example
    ("96385074", 4),  # an EAN-8 textbook example
]


@pytest.mark.parametrize(("code", "digit"), KNOWN)
def test_the_check_digit_is_gs1_mod_10(code, digit):
    assert check_digit(code[:-1]) == digit
    assert gtin14(code) == code.zfill(14)


def test_a_wrong_check_digit_is_refused_with_what_to_do():
    with pytest.raises(BarcodeError, match=r"check digit 7 does not match 6: .*rescan"):
        gtin14("00312345678907")
    with pytest.raises(BarcodeError, match="has 8, 12, 13 or 14 digits, this code has 10"):
        gtin14("0312345678")
    with pytest.raises(BarcodeError, match="digits only"):
        gtin14("0031234567890X")


def test_a_raw_datamatrix_element_string_with_its_fields():
    raw = "]d2" + "0100312345678906" + "17270300" + "10LOT-42A" + GS + "21SN0001"
    scan = parse_scan(raw)
    assert scan.gtin == "00312345678906"
    assert scan.expiry == date(2027, 3, 31)  # day 00: the month's last day
    assert (scan.lot, scan.serial) == ("LOT-42A", "SN0001")
    assert "12345067890" in scan.ndc11_candidates()  # 5-3-2 -> 5-4-2


def test_the_bracketed_form_reads_the_same():
    scan = parse_scan("(01)00312345678906(17)270315(10)LOT-42A(21)SN0001")
    assert (scan.gtin, scan.expiry, scan.lot, scan.serial) == ("00312345678906", date(2027, 3, 15), "LOT-42A", "SN0001")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("1712345610ABC", "no product code"),
        ("0100312345678907", "check digit"),
        ("99ABC", "unknown GS1 application identifier"),
        ("(01)00312345678906(17)271340", "no such month"),
        ("(01)00312345678906(17)270231", "no such day"),
        ("010031234567891", "must be 14 digits"),  # AI 01 with 13 digits (14 bare digits are an ITF-14 GTIN)
        ("00312345678907", "check digit"),  # a bare GTIN-14 (ITF-14, DataBar) is checked too
        ("hello", "not a GS1 element string|unknown GS1"),
    ],
)
def test_unreadable_scans_say_why(raw, reason):
    with pytest.raises(BarcodeError, match=reason):
        parse_scan(raw)


def test_ndc_forms():
    assert ndc11("1234-5678-90") == "01234567890"  # 4-4-2
    assert ndc11("12345-678-90") == "12345067890"  # 5-3-2
    assert ndc11("12345-6789-0") == "12345678900"  # 5-4-1
    assert ndc11("12345678901") == "12345678901"
    assert ndc11_candidates("1234567890") == ("01234567890", "12345067890", "12345678900")
    with pytest.raises(BarcodeError):
        ndc11("123-45-6")
    assert parse_scan("0412345678903").ndc11_candidates() == ()  # not a US drug GTIN
