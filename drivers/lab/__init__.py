"""Lab analyzer drivers: profiles, ASTM and HL7 results, host-query answers and order pushes."""
