"""Import shim: the converter lives in projects/Distillation/tools (a script folder)."""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects",
                     "Distillation", "tools", "convert_torchvision_backbone.py")
_spec = importlib.util.spec_from_file_location("convert_torchvision_backbone", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
convert = _module.convert
