"""Client-side tools that talk to a running bedside: the Python client and the replay of synthetic
or recorded HL7 vitals and 12-lead ECG. Nothing here is imported by the server."""
