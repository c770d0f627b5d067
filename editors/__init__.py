"""SAKE editors: model adapters (``editors.models``), editing methods (one module each, registered in
``editors.base``), hyperparameters (``editors/hparams/*.yaml``) and the runner (``python -m editors.run``)."""
