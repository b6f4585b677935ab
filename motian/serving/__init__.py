"""The serving layer: export to ONNX / Hugging Face, the ONNX Runtime session, batch prediction."""
