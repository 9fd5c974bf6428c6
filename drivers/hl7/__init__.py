"""HL7 v2 over MLLP: sans-IO framing, MSH reading, decoding and original-mode ACKs."""
