"""The asset store: local directories and object stores behind one choice (``backend``), the guarded
read of referenced images, and image decoding."""
