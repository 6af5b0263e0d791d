"""postprocessing: token windows -> text; the work is in tgi_backend.serving.postprocessing."""
from tgi_backend.serving.postprocessing import TritonPythonModel  # noqa: F401
