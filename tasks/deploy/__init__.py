"""Deployment: export to ONNX and TorchScript (float and int8), serving an export through ONNX Runtime, and
the speed report."""
