"""Pure-torch model code: the UniMiSS MiT backbone, self-distillation pieces and downstream heads.

Nothing here reads or writes files or imports orchestration/storage libraries; see
``/work/shared/methods/unimiss.md`` for the method this package implements.
"""
