"""Paper ECG: digitizing a scanned printout back into a 12-lead waveform."""
