"""Base checkpoints: lazy, sharded, pickle-safe reading (reader.py), the safetensors layer
(safetensors_io.py) and atomic writing (writer.py). Importing the package imports none of them."""
