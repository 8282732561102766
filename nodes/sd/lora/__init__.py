"""LoRA support: formats (ΔW math), key maps, family detection, file loading and the coverage report.

Weights are changed only by `nodes.sd.patcher.patched`.
"""
