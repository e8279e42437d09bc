"""Exporters of one-timestep SNNs (ONNX, TFLite, C firmware, NIR).

Nothing is exported yet: the exporters arrive with the export stage
(DESIGN.md, "export"). The package exists so that the import name
``edgesnn.export`` is reserved for them.
"""
