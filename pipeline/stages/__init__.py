"""Pure stage functions: tensors in, tensors out. No Luigi and no file layout here, so a stage can be called
from a notebook with tensors in hand."""
