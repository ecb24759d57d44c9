"""Triton model repositories: config.pbtxt files built as protobuf (render), the ensemble around the model (repo),
TensorRT-LLM's tensor names (trtllm).

This package module imports nothing: render loads tritonclient's protobuf classes, and with them grpc (about 0.15 s),
which only a sub-stage that writes a repository needs, not the launcher that plans it.
"""

# Triton's python backend: it runs the text models (and the python runtime's model).
PYTHON_BACKEND = "python"
