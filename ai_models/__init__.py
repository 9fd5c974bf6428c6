"""ONNX triage: model cards, preprocessing, inference sessions (AI triage issue)."""
