"""tgi_llm: the decoupled LLM model; all the work is in tgi_backend.serving.triton_model."""
from tgi_backend.serving.triton_model import TritonPythonModel  # noqa: F401
