"""ASTM E1381 (LIS01-A2) link layer and E1394 (LIS02-A2) records, sans-IO, plus their
asyncio session with an analyzer."""
