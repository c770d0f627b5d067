"""SAKE metric internals, importable as `eval.sake_metric.<module>`.

`sake_metric.py` is the `evaluate` module (`evaluate.load("eval/sake_metric")`); the other modules hold the
logic it and `eval.score` share. They use only relative imports among themselves so that `evaluate` can copy
them next to the script. Nothing here imports torch.
"""
