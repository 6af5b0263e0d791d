"""tgi-triton: TGI rebuilt as a Triton Inference Server Python-backend model repository."""
__version__ = "0.1.0"
