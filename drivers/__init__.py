"""medgw drivers: device and LIS/HIS protocols (ASTM, HL7 v2 + MLLP) and their transports."""
