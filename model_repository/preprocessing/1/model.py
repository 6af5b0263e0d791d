"""preprocessing: text_input -> input_ids; the work is in tgi_backend.serving.preprocessing."""
from tgi_backend.serving.preprocessing import TritonPythonModel  # noqa: F401
