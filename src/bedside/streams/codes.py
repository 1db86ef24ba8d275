"""Observation codes of patient monitors (LOINC, IEEE 11073 MDC, plain mnemonics) and the vital
sign each names, with the physiologically possible range of each numeric one."""

from __future__ import annotations

# observation code -> vital sign
CODES: dict[str, str] = {
    # heart / pulse rate
    "8867-4": "heart_rate",
    "147842": "heart_rate",
    "149530": "heart_rate",
    "MDC_ECG_HEART_RATE": "heart_rate",
    "MDC_PULS_OXIM_PULS_RATE": "heart_rate",
    "HR": "heart_rate",
    # blood pressure
    "8480-6": "systolic_bp",
    "150021": "systolic_bp",
    "150017": "systolic_bp",
    "MDC_PRESS_BLD_NONINV_SYS": "systolic_bp",
    "MDC_PRESS_BLD_ART_SYS": "systolic_bp",
    "SBP": "systolic_bp",
    "8462-4": "diastolic_bp",
    "150022": "diastolic_bp",
    "150018": "diastolic_bp",
    "MDC_PRESS_BLD_NONINV_DIA": "diastolic_bp",
    "MDC_PRESS_BLD_ART_DIA": "diastolic_bp",
    "DBP": "diastolic_bp",
    # oxygen saturation
    "59408-5": "spo2",
    "2708-6": "spo2",
    "20564-1": "spo2",
    "150456": "spo2",
    "MDC_PULS_OXIM_SAT_O2": "spo2",
    "SPO2": "spo2",
    # respiratory rate
    "9279-1": "respiratory_rate",
    "151562": "respiratory_rate",
    "MDC_RESP_RATE": "respiratory_rate",
    "MDC_TTHOR_RESP_RATE": "respiratory_rate",
    "RR": "respiratory_rate",
    # temperature
    "8310-5": "temperature",
    "8331-1": "temperature",
    "150344": "temperature",
    "188496": "temperature",
    "MDC_TEMP": "temperature",
    "MDC_TEMP_BODY": "temperature",
    "TEMP": "temperature",
    # level of consciousness (ACVPU)
    "67775-7": "consciousness",
    "80288-4": "consciousness",
    "ACVPU": "consciousness",
    "AVPU": "consciousness",
    # supplemental oxygen: flow (L/min) or inspired fraction (%), or a yes/no flag
    "3151-8": "oxygen_flow",
    "19996-8": "oxygen_flow",
    "3150-0": "fio2",
    "O2SUPP": "on_oxygen",
}
PLAUSIBLE = {  # physiologically possible ranges: values outside are device errors, not patients
    "heart_rate": (0, 350),
    "systolic_bp": (0, 350),
    "diastolic_bp": (0, 250),
    "spo2": (0, 100),
    "respiratory_rate": (0, 120),
    "temperature": (20, 45),
    "oxygen_flow": (0, 80),
    "fio2": (21, 100),
}
NUMERIC = set(PLAUSIBLE)  # the vital signs sent as numbers


SKIPPED_STATUS = {"D", "I", "N", "O", "W", "X"}  # OBX-11: deleted, pending, not asked, order, wrong, no result
LEVELS = {  # level of consciousness (ACVPU): the letters and the words monitors send
    **{c: c for c in "ACVPU"},
    **{"ALERT": "A", "CONFUSED": "C", "CONFUSION": "C", "NEW CONFUSION": "C", "VOICE": "V", "VERBAL": "V"},
    **{"PAIN": "P", "UNRESPONSIVE": "U"},
}
