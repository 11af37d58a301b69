"""Data layer: reading MRI series and reports, the manifest, preprocessing and the prepared cache."""
