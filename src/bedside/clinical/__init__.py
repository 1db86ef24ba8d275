"""Clinical domain knowledge shared by serving, training and tools: the 12-lead ECG format and its
R-peak analysis, and the vital-sign features models are trained and scored on."""
