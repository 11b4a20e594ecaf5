"""Brain-tumour MRI classification pipeline: data stages, training, evaluation, serving."""

__version__ = "0.1.0"
