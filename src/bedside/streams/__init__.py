"""Bedside streams: HL7v2 vital signs over MLLP, 12-lead ECG waveforms, per-bed state and scoring."""
